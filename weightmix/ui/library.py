"""The models directories the UI may touch: every path the browser names is resolved here, and
one outside them (absolute elsewhere, or spelled with '..') is refused before anything opens.

Models are named to the browser by their absolute path (what a recipe written by the UI holds,
so that `weightmix merge` re-runs it from anywhere on the machine); outputs by a path inside
the first models directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from weightmix.errors import WeightmixError
from weightmix.io.reader import PICKLE_SUFFIXES

MODEL_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
SEARCH_DEPTH = 3  # folders below a models directory that are searched for models


@dataclass(frozen=True)
class ModelFile:
    path: Path
    size: int
    modified: float


class ModelDirs:
    """The configured models directories (each must exist); the first holds outputs and the
    merge history."""

    def __init__(self, dirs: list[Path]) -> None:
        resolved = []
        for given in dirs:
            path = Path(given).expanduser()
            if not path.is_dir():
                what = "is not a directory" if path.exists() else "does not exist"
                raise WeightmixError(
                    f"models directory {str(given)!r} {what}: give an existing folder with"
                    " --models-dir (or create it)"
                )
            resolved.append(path.resolve())
        if not resolved:
            resolved.append(Path.cwd().resolve())
        self.dirs = resolved

    @property
    def first(self) -> Path:
        return self.dirs[0]

    def inside(self, path: Path) -> bool:
        """Whether a resolved path lies in one of the directories."""
        return any(path == d or d in path.parents for d in self.dirs)

    def resolve(self, given: str, what: str = "path") -> Path:
        """`given` (absolute, or relative to the first directory) as a resolved path inside
        the directories; '..' and anything outside are refused."""
        text = str(given).strip()
        if not text or "\x00" in text:
            raise WeightmixError(f"{what} {text!r}: empty or not a path")
        if ".." in PurePosixPath(text.replace("\\", "/")).parts:
            raise WeightmixError(f"{what} {text!r}: '..' is not allowed; name a file inside"
                                 f" the models directories ({self.listing()})")  # fmt: skip
        path = Path(text)
        resolved = (path if path.is_absolute() else self.first / path).resolve()
        if not self.inside(resolved):
            raise WeightmixError(
                f"{what} {text!r} is outside the models directories ({self.listing()}): the UI"
                " reads and writes only there"
            )
        return resolved

    def model(self, given: str) -> Path:
        """An existing model file (by its suffix: no index or other file), or diffusers
        pipeline folder, inside the directories."""
        path = self.resolve(given, "model")
        if is_pipeline(path):
            self.check_tree(path, "model")
            return path
        if not path.is_file():
            raise WeightmixError(f"model {given!r} does not exist in the models directories")
        if not path.name.endswith(MODEL_SUFFIXES):
            raise WeightmixError(f"model {given!r}: not a model file ({', '.join(MODEL_SUFFIXES)})"
                                 " or a diffusers pipeline folder")  # fmt: skip
        return path

    def check_tree(self, folder: Path, what: str) -> None:
        """Every file and folder under `folder`, links followed, lies inside the directories."""
        seen: set[str] = set()
        for here, subfolders, files in os.walk(folder, followlinks=True):
            real = os.path.realpath(here)
            if real in seen:  # a link back up: walked already
                subfolders[:] = []
                continue
            seen.add(real)
            for name in [*subfolders, *files]:
                if not self.inside(Path(os.path.realpath(os.path.join(here, name)))):
                    raise WeightmixError(
                        f"{what} {folder}: {os.path.join(here, name)} leads outside the models"
                        f" directories ({self.listing()}): the UI reads only there"
                    )

    def output(self, given: str, inputs: list[Path], overwrite: bool) -> Path:
        """Where a merge may write: a .safetensors file (or, for pipeline folders, a folder
        name without a suffix) inside the first directory that is none of the inputs, and new
        unless `overwrite`."""
        path = self.resolve(given, "output")
        if self.first not in path.parents:
            raise WeightmixError(
                f"output {given!r}: outputs go in the first models directory ({self.first})"
            )
        if path.suffix not in (".safetensors", ""):
            raise WeightmixError(f"output {given!r}: name a .safetensors file (or a folder,"
                                 " for pipeline folders)")  # fmt: skip
        if any(path == p or p in path.parents for p in inputs):
            raise WeightmixError(f"output {given!r} is one of the merge's inputs: name a new file")
        if path.exists() and not overwrite:
            raise WeightmixError(
                f"output {given!r} exists: choose another name or tick 'overwrite'"
            )
        return path

    def _tree_inside(self, folder: Path) -> bool:
        try:
            self.check_tree(folder, "model")
        except WeightmixError:
            return False
        return True

    def listing(self) -> str:
        return ", ".join(str(d) for d in self.dirs)

    def models(self) -> list[ModelFile]:
        """Every model file and diffusers pipeline folder in the directories (up to
        SEARCH_DEPTH folders down), by path; hidden files and folders are skipped, links
        leading outside too."""
        found: dict[Path, ModelFile] = {}
        for root in self.dirs:
            for folder, subfolders, files in os.walk(root):
                here = Path(folder)
                if here != root and is_pipeline(here):
                    resolved = here.resolve()
                    if self.inside(resolved) and self._tree_inside(resolved):
                        size = sum(f.stat().st_size for f in resolved.rglob("*")
                                   if f.is_file() and f.suffix in MODEL_SUFFIXES)  # fmt: skip
                        found[resolved] = ModelFile(resolved, size, resolved.stat().st_mtime)
                    subfolders[:] = []
                    continue
                depth = len(here.relative_to(root).parts)
                deeper = depth < SEARCH_DEPTH
                subfolders[:] = sorted(s for s in subfolders if deeper and not s.startswith("."))
                for name in sorted(files):
                    if name.startswith(".") or not name.endswith(MODEL_SUFFIXES):
                        continue
                    path = (Path(folder) / name).resolve()
                    if self.inside(path) and path.is_file():
                        stat = path.stat()
                        found[path] = ModelFile(path, stat.st_size, stat.st_mtime)
        return sorted(found.values(), key=lambda m: str(m.path))


def is_pipeline(path: Path) -> bool:
    """A diffusers pipeline folder (model_index.json beside its components' folders)."""
    return path.is_dir() and (path / "model_index.json").is_file()
