"""Build the small example checkpoints that `make demo` merges: python -m weightmix.examples DIR

Three SD1.5-layout checkpoints (real key names, every dimension divided by 16, fp16) named
base, anime and photo, as in a typical add-difference workflow, and a small CLIP-style
tokenizer (DIR/tokenizer) for the prompt examples: the models hold no real vocabulary.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from weightmix.arch.synthetic import write_synthetic

EXAMPLE_MODELS = {"base": 1, "anime": 2, "photo": 3}  # name -> seed


def build_examples(folder: Path, divisor: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, seed in EXAMPLE_MODELS.items():
        path = folder / f"{name}.safetensors"
        keys = write_synthetic(path, "sd1-ldm", seed=seed, divisor=divisor)
        print(f"built {path}: SD1.5 layout, {len(keys)} tensors, dimensions / {divisor}, fp16")
        paths.append(path)
    write_example_tokenizer(folder / "tokenizer")
    print(f"built {folder / 'tokenizer'}: a CLIP-style tokenizer of letters and a few words")
    return paths


EXAMPLE_WORDS = ("anime", "photo", "portrait", "style", "girl", "cinematic", "lighting", "red",
                 "fox", "detailed", "colors", "vibrant")  # fmt: skip


def write_example_tokenizer(folder: Path) -> Path:
    """vocab.json and merges.txt in CLIP's format: each letter alone and word-final ('a</w>'),
    then merges that spell EXAMPLE_WORDS, then the start and end tokens; small enough for the
    example models' token embeddings."""
    folder.mkdir(parents=True, exist_ok=True)
    merges: dict[tuple[str, str], None] = {}
    for word in EXAMPLE_WORDS:
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            merges[(parts[0], parts[1])] = None
            parts = [parts[0] + parts[1], *parts[2:]]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [*letters, *(c + "</w>" for c in letters), *dict.fromkeys(a + b for a, b in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    lines = "".join(f"{a} {b}\n" for a, b in merges)
    (folder / "merges.txt").write_text("#version: 0.2\n" + lines, encoding="utf-8")
    return folder


if __name__ == "__main__":
    build_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "demo"))
