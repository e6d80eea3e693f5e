"""Hyper-Merge's configuration: the seed's YAML (`name`, `models`, `device`, `dtype`,
`iterations`, `ranks`), plus optional `output` (a folder) and `keys` (globs of the model keys
the LoRAs carry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from weightmix.errors import WeightmixError
from weightmix.recipe import not_a_bool

Count = Annotated[int, BeforeValidator(not_a_bool), Field(ge=1)]
SEED_DTYPES = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32", "float64": "fp64"}


class HyperConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, pattern=r"^[^/\\]+$")]
    models: list[str] = Field(min_length=2)
    device: str = "cpu"
    dtype: str = "float16"  # of the outputs (the seed's names, or fp16, bf16, fp32, fp64)
    iterations: Annotated[int, BeforeValidator(not_a_bool), Field(ge=2)] = 6
    ranks: list[Count] = Field(min_length=1)
    output: str | None = None  # the folder the files go to; default: the config's folder
    keys: list[str] | None = None  # globs of the keys the LoRAs carry; default: all they can
    compute_dtype: str = "fp32"  # Δ, SVDs and multipliers (fp64 for exact toy cases)

    @property
    def output_dtype(self) -> str:
        return SEED_DTYPES.get(self.dtype, self.dtype)


def load_config(path: Path) -> tuple[HyperConfig, Path]:
    """The config and the folder its relative paths are taken from."""
    from weightmix.recipe import read_yaml_file

    data = read_yaml_file(path, "config")
    try:
        config = HyperConfig.model_validate(data)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "config"
        message = str(problem["msg"]).removeprefix("Value error, ")
        raise WeightmixError(f"{path}: {where}: {message}") from None
    return config, path.parent


def model_paths(config: HyperConfig, folder: Path) -> list[Path]:
    return [p if (p := Path(m).expanduser()).is_absolute() else folder / p for m in config.models]


def output_folder(config: HyperConfig, folder: Path) -> Path:
    if config.output is None:
        return folder
    path = Path(config.output).expanduser()
    return path if path.is_absolute() else folder / path


def file_names(config: HyperConfig, folders: bool = False) -> dict[str, object]:
    """{name}_average.safetensors (a folder {name}_average for folder models), one
    {name}_{step}-{rank}.safetensors per LoRA, {name}_multipliers.txt and its JSON twin."""
    return {
        "average": f"{config.name}_average" + ("" if folders else ".safetensors"),
        "loras": [
            f"{config.name}_{step}-{rank}.safetensors" for step, rank in enumerate(config.ranks)
        ],
        "multipliers": f"{config.name}_multipliers.txt",
        "json": f"{config.name}_multipliers.json",
    }
