"""Model folders: diffusers pipelines (model_index.json with a subfolder per component) and
single component folders (config.json plus weights: diffusers models, transformers models,
LLM folders). They read as one checkpoint; pipeline keys are prefixed by their component,
e.g. 'unet/conv_in.weight'. Outputs mirror the base folder (see io/folder_output.py)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from weightmix.errors import WeightmixError
from weightmix.io.configs import check_config
from weightmix.io.header import load_json
from weightmix.io.reader import INDEX_SUFFIX, Checkpoint, TensorInfo

# weight file stems diffusers and transformers write, in the order their loaders prefer
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
# pickled weights -> the stem of the safetensors file that replaces them in an output
PICKLED_WEIGHTS = {
    "diffusion_pytorch_model.bin": "diffusion_pytorch_model",
    "pytorch_model.bin": "model",
}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".h5", ".onnx")
SEPARATOR = "/"  # between a pipeline component and the key inside it


@dataclass(frozen=True)
class Component:
    """One folder of weights: its name in the pipeline ('' for a lone component folder), the
    weights it was read from, and the file stem an output should use to match it."""

    name: str
    folder: Path
    weights: Path
    stem: str
    shard_bytes: int | None  # the largest shard, when the weights are sharded


def is_model_folder(folder: Path) -> bool:
    return (folder / "model_index.json").is_file() or (folder / "config.json").is_file()


def find_weights(folder: Path) -> tuple[Path, str] | None:
    """The weights of a component folder and the stem an output should be named by."""
    for stem in WEIGHT_STEMS:
        for name in (stem + INDEX_SUFFIX, stem + ".safetensors"):
            if (folder / name).is_file():
                return folder / name, stem
    for name, stem in PICKLED_WEIGHTS.items():
        if (folder / name).is_file():
            return folder / name, stem
    for stem in WEIGHT_STEMS:  # a hub 'variant' download: diffusion_pytorch_model.fp16.safetensors
        variants = sorted(folder.glob(f"{stem}.*.safetensors"))
        if len(variants) == 1:
            return variants[0], variants[0].name.removesuffix(".safetensors")
    return None


def _weight_like(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(WEIGHT_SUFFIXES))


class FolderCheckpoint(Checkpoint):
    """A pipeline or component folder read through its components' own checkpoints."""

    def __init__(self, path: Path, pipeline: bool, parts: list[tuple[Component, Checkpoint]]):
        self.pipeline = pipeline
        self.components = [component for component, _ in parts]
        self._sources: dict[str, tuple[Checkpoint, TensorInfo]] = {}
        tensors: dict[str, TensorInfo] = {}
        files: list[Path] = []
        for component, checkpoint in parts:
            files += checkpoint.files
            for key, info in checkpoint.tensors.items():
                name = f"{component.name}{SEPARATOR}{key}" if pipeline else key
                tensors[name] = TensorInfo(
                    name, info.dtype, info.shape, info.file, info.offset, info.nbytes
                )
                self._sources[name] = (checkpoint, info)
        super().__init__(path, tensors, files)
        for component, checkpoint in parts:
            self.notes += [f"{component.name or path.name}: {note}" for note in checkpoint.notes]
        self._parts = [checkpoint for _, checkpoint in parts]

    @property
    def metadata(self) -> dict[str, str]:
        return self._parts[0].metadata if self._parts else {}

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        checkpoint, inner = self._sources[info.key]
        checkpoint.read_range(inner, start, out)

    def reads_cheaply(self, info: TensorInfo) -> bool:
        checkpoint, inner = self._sources[info.key]
        return checkpoint.reads_cheaply(inner)

    def fingerprint_parts(self) -> list[tuple[Path, bytes, int]]:
        return [part for checkpoint in self._parts for part in checkpoint.fingerprint_parts()]

    def check_unchanged(self) -> None:
        for part in self._parts:
            part.check_unchanged()

    def component_of(self, key: str) -> str:
        return key.split(SEPARATOR, 1)[0] if self.pipeline else ""

    def close(self) -> None:
        for part in self._parts:
            part.close()


def open_folder(folder: Path, open_part) -> FolderCheckpoint:
    """Open a pipeline or a component folder; `open_part` opens one weights file or index."""
    if (folder / "model_index.json").is_file():
        return _open_pipeline(folder, open_part)
    component = _component(folder, "")
    if component is None:
        raise WeightmixError(
            f"{folder}: has config.json but no weights (diffusion_pytorch_model.safetensors,"
            " model.safetensors, a sharded index or a .bin)"
        )
    return FolderCheckpoint(folder, False, [(component, _open_part(component, open_part))])


def _open_pipeline(folder: Path, open_part) -> FolderCheckpoint:
    try:
        raw = (folder / "model_index.json").read_bytes()
    except OSError as error:
        raise WeightmixError(f"{folder}/model_index.json: cannot read: {error}") from None
    index = load_json(raw, f"{folder}/model_index.json", ": fix or re-download it")
    if not isinstance(index, dict):
        raise WeightmixError(f"{folder}/model_index.json: is not a JSON object")
    parts = []
    for name in sorted(k for k in index if not k.startswith("_")):
        if name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise WeightmixError(
                f"{folder}/model_index.json: names the component '{name}', which is not a folder"
                " name: a pipeline's components are its own subfolders; fix or re-download it"
            )
        sub = folder / name
        if not _is_dir(sub):
            continue  # e.g. "safety_checker": [null, null]
        component = _component(sub, name)
        if component is not None:
            parts.append((component, _open_part(component, open_part)))
        elif (sub / "config.json").is_file():
            raise WeightmixError(f"{sub}: component {name} has config.json but no weights")
    if not parts:
        raise WeightmixError(f"{folder}: a pipeline folder whose components hold no weights")
    return FolderCheckpoint(folder, True, parts)


def _is_dir(path: Path) -> bool:
    """Path.is_dir, with a name the file system refuses (too long ...) a WeightmixError."""
    try:
        return path.is_dir()
    except OSError as error:
        raise WeightmixError(f"{path}: cannot be opened: {error.strerror or error}") from None


def _component(folder: Path, name: str) -> Component | None:
    found = find_weights(folder)
    if found is None:
        files = _weight_like(folder)
        if files and name:  # weights there, but none we can read: never drop them silently
            raise WeightmixError(
                f"{folder}: component {name} has weights weightmix does not read"
                f" ({', '.join(files[:3])}): give diffusion_pytorch_model.safetensors,"
                " model.safetensors, a sharded set or a .bin (one variant file at most)"
            )
        return None
    weights, stem = found
    shard_bytes = None
    if weights.name.endswith(INDEX_SUFFIX):
        shard_bytes = max(
            (p.stat().st_size for p in folder.glob(f"{stem}-*.safetensors")), default=None
        )
    return Component(name, folder, weights, stem, shard_bytes)


def _open_part(component: Component, open_part) -> Checkpoint:
    try:
        checkpoint = open_part(component.weights)
    except WeightmixError as error:
        where = f"component {component.name}: " if component.name else ""
        raise WeightmixError(f"{where}{error}") from None
    try:
        check_config(component.folder, checkpoint.tensors)
    except BaseException:
        checkpoint.close()
        raise
    return checkpoint
