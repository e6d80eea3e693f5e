"""CLIP's tokenizer, from local files only: a `--tokenizer` folder, the text encoder's diffusers
folder (`tokenizer/`), or a package that ships CLIP's byte-pair vocabulary (open_clip, clip)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from weightmix.errors import WeightmixError

VOCABULARY_FILES = (("vocab.json", "merges.txt"),)  # what CLIPTokenizer reads in 4.x and 5.x
PACKAGE_VOCABULARIES = (("open_clip", "bpe_simple_vocab_16e6.txt.gz"),
                        ("clip", "bpe_simple_vocab_16e6.txt.gz"))  # fmt: skip
CLIP_MERGES = 49152 - 256 - 2  # the merges CLIP's vocabulary uses from that file
START, END = "<|startoftext|>", "<|endoftext|>"


@dataclass(frozen=True)
class TokenizerSource:
    """Where the tokenizer comes from: a folder transformers reads, or a package's BPE file."""

    folder: Path | None
    package_file: Path | None
    text: str  # for notes: 'tokenizer/ of /models/sdxl'

    def load(self):
        """A transformers CLIPTokenizer (needs the `prompts` extra)."""
        from transformers import CLIPTokenizer

        try:
            if self.folder is not None:
                tokenizer = CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True)
            else:
                assert self.package_file is not None
                with tempfile.TemporaryDirectory(prefix="weightmix-clip-vocab-") as folder:
                    write_vocabulary(self.package_file, Path(folder))
                    tokenizer = CLIPTokenizer.from_pretrained(folder, local_files_only=True)
        except WeightmixError:
            raise
        except Exception as error:  # transformers and tokenizers raise many kinds
            problem = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise WeightmixError(
                f"tokenizer {self.text}: cannot be read ({type(error).__name__}: {problem}): give"
                " a CLIP tokenizer folder with a valid vocab.json and merges.txt"
            ) from None
        tokenizer.model_max_length = 1 << 30  # weightmix cuts prompts to the encoder itself
        return tokenizer


def has_vocabulary(folder: Path) -> bool:
    return any(all((folder / name).is_file() for name in names) for names in VOCABULARY_FILES)


def find_tokenizer(given: Path | None, encoder_paths: list[Path]) -> TokenizerSource:
    """`given` (a folder with vocab.json and merges.txt, or tokenizer.json); else `tokenizer/`
    beside the text encoder (a diffusers pipeline, or a component folder's parent); else a
    package's vocabulary. One line naming all three when none is found."""
    if given is not None:
        if not given.is_dir():
            raise WeightmixError(
                f"tokenizer {given}: no such folder: give a folder with vocab.json and merges.txt"
            )
        folder = given / "tokenizer" if has_vocabulary(given / "tokenizer") else given
        if not has_vocabulary(folder):
            raise WeightmixError(
                f"tokenizer {given}: holds no vocab.json with merges.txt:"
                " give a CLIP tokenizer folder, e.g. a diffusers model's tokenizer/"
            )
        return TokenizerSource(folder, None, str(folder))
    for path in encoder_paths:  # a pipeline's tokenizer/, or beside a text_encoder/ folder
        candidates = [path / "tokenizer"]
        if path.name.startswith("text_encoder"):
            candidates.append(path.parent / "tokenizer")
        for folder in candidates:
            if path.is_dir() and has_vocabulary(folder):
                return TokenizerSource(folder, None, str(folder))
    for package, name in PACKAGE_VOCABULARIES:
        found = package_file(package, name)
        if found is not None:
            return TokenizerSource(None, found, f"{name} of the {package} package")
    packages = " or ".join(p for p, _ in PACKAGE_VOCABULARIES)
    sources = ", ".join(str(p) for p in encoder_paths)
    raise WeightmixError(
        f"the prompt needs CLIP's tokenizer and none was found: no --tokenizer was given, the"
        f" text encoder ({sources}) has no diffusers tokenizer/ folder, and no package that"
        f" ships CLIP's vocabulary ({packages}) is installed; give --tokenizer DIR (a folder"
        " with vocab.json and merges.txt, e.g. a diffusers model's tokenizer/)"
    )


def package_file(package: str, name: str) -> Path | None:
    """A data file of an installed package, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / name
        if path.is_file():
            return path
    return None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 bytes to printable characters, in CLIP's order:
    the printable bytes first (as themselves), then the others (as chr(256 + n))."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]  # fmt: skip
    table = {byte: chr(byte) for byte in printable}
    others = [byte for byte in range(256) if byte not in table]
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def write_vocabulary(bpe_file: Path, folder: Path) -> None:
    """CLIP's vocab.json and merges.txt from its gzipped merge list: the 256 byte characters,
    the same with '</w>', one token per merge in order, then the start and end tokens."""
    try:
        with gzip.open(bpe_file, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as error:
        raise WeightmixError(f"{bpe_file}: cannot read CLIP's vocabulary: {error}") from None
    merges = [tuple(line.split()) for line in lines[1 : CLIP_MERGES + 1] if line.strip()]
    characters = list(bytes_to_unicode().values())
    tokens = [*characters, *(c + "</w>" for c in characters), *("".join(m) for m in merges)]
    tokens += [START, END]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    text = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + text, encoding="utf-8")
