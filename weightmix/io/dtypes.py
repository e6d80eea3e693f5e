"""Tensor element types: safetensors names, torch dtypes, sizes and user-facing aliases."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from weightmix.errors import WeightmixError


@dataclass(frozen=True)
class DType:
    """One element type as safetensors names it (e.g. 'F16'), with its torch twin."""

    name: str
    torch: torch.dtype
    itemsize: int
    is_float: bool
    short: str  # the name users type: fp16, bf16, i64 ...

    def __str__(self) -> str:
        return self.short


# every dtype safetensors defines that weightmix handles: (name, torch name, bytes, float, short)
ALL_ROWS = [
    ("F64", "float64", 8, True, "fp64"),
    ("F32", "float32", 4, True, "fp32"),
    ("F16", "float16", 2, True, "fp16"),
    ("BF16", "bfloat16", 2, True, "bf16"),
    ("F8_E4M3", "float8_e4m3fn", 1, True, "fp8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2", 1, True, "fp8_e5m2"),
    ("I64", "int64", 8, False, "i64"),
    ("I32", "int32", 4, False, "i32"),
    ("I16", "int16", 2, False, "i16"),
    ("I8", "int8", 1, False, "i8"),
    ("U64", "uint64", 8, False, "u64"),
    ("U32", "uint32", 4, False, "u32"),
    ("U16", "uint16", 2, False, "u16"),
    ("U8", "uint8", 1, False, "u8"),
    ("BOOL", "bool", 1, False, "bool"),
]


def _table() -> dict[str, DType]:
    table = {}
    for name, torch_name, size, is_float, short in ALL_ROWS:
        torch_dtype = getattr(torch, torch_name, None)
        if torch_dtype is not None:  # older torch builds lack some (fp8, unsigned)
            table[name] = DType(name, torch_dtype, size, is_float, short)
    return table


SAFETENSORS_DTYPES: dict[str, DType] = _table()
_BY_TORCH = {d.torch: d for d in SAFETENSORS_DTYPES.values()}
_ALIASES = {
    **{d.short: d for d in SAFETENSORS_DTYPES.values()},
    **{str(d.torch).removeprefix("torch."): d for d in SAFETENSORS_DTYPES.values()},
    **{d.name.lower(): d for d in SAFETENSORS_DTYPES.values()},
    "half": SAFETENSORS_DTYPES["F16"],
    "float": SAFETENSORS_DTYPES["F32"],
    "double": SAFETENSORS_DTYPES["F64"],
    **({"fp8": SAFETENSORS_DTYPES["F8_E4M3"]} if "F8_E4M3" in SAFETENSORS_DTYPES else {}),
}
# names safetensors defines that this torch build cannot hold (e.g. fp8 before torch 2.1)
UNSUPPORTED_HERE = {row[0] for row in ALL_ROWS} - SAFETENSORS_DTYPES.keys()

OUTPUT_DTYPES = ("fp32", "fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2", "fp64")
COMPUTE_DTYPES = ("fp64", "fp32", "fp16", "bf16")


def dtype_from_name(name: str, allowed: tuple[str, ...] | None = None) -> DType:
    """Resolve a user-typed dtype ('fp16', 'float16', 'F16', 'half') or raise a one-line error."""
    dtype = _ALIASES.get(str(name).strip().lower())
    if dtype is None or (allowed is not None and dtype.short not in allowed):
        choices = ", ".join(allowed or OUTPUT_DTYPES)
        raise WeightmixError(f"unknown or unsupported dtype '{name}': use one of {choices}")
    return dtype


def holds_every_value(source: DType, target: DType) -> bool:
    """Whether every value of float dtype `source` is also a value of float dtype `target`, so
    that casting to `target` loses nothing (bf16 -> fp32, fp8 -> fp16; not fp16 <-> bf16)."""
    if source == target:
        return True
    s, t = torch.finfo(source.torch), torch.finfo(target.torch)
    smallest_s, smallest_t = s.smallest_normal * s.eps, t.smallest_normal * t.eps  # subnormals
    return t.eps <= s.eps and t.max >= s.max and smallest_t <= smallest_s


def dtype_of(tensor: torch.Tensor) -> DType:
    """The DType of a torch tensor."""
    return _BY_TORCH[tensor.dtype]
