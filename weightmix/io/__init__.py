"""Everything that touches checkpoint bytes. Knows nothing about merge methods."""

from weightmix.io.dtypes import DType, dtype_from_name
from weightmix.io.reader import Checkpoint, TensorInfo, open_checkpoint
from weightmix.io.writer import OutputTensor, open_output

__all__ = [
    "Checkpoint",
    "DType",
    "OutputTensor",
    "TensorInfo",
    "dtype_from_name",
    "open_checkpoint",
    "open_output",
]
