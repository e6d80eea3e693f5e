"""A LoRA read as a model of task vectors: it has the model's key names and shapes, and a key
holds (alpha / rank) · up · down on the rows the LoRA adapts, zeros elsewhere. Recipes use it
as a delta (`add(model, scale(lora, factor=0.8))`); rows are computed when the engine reads
them, so a LoRA never becomes a whole model in memory."""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch

from weightmix.errors import WeightmixError
from weightmix.io.dtypes import DType, dtype_from_name
from weightmix.io.reader import Checkpoint, TensorInfo
from weightmix.lora.formats import LoraLayer, read_layers
from weightmix.lora.targets import ModelIndex, Segment
from weightmix.units import count

FP32 = dtype_from_name("fp32")
SHOWN = 3


class LoraDelta(Checkpoint):
    """`lora` seen with the key names and shapes of `model` (which it does not own)."""

    def __init__(self, lora: Checkpoint, model: Checkpoint, where: str, dtype: DType = FP32):
        self.lora = lora
        self.dtype = dtype  # of the update: the merge's compute dtype
        self.format, layers = read_layers(lora, where)
        index = ModelIndex(model)
        self.changes: dict[str, list[tuple[LoraLayer, Segment]]] = defaultdict(list)
        unmatched = []
        for layer in layers:
            segments = index.lookup(layer.part, layer.module)
            if not segments:
                unmatched.append(layer)
            for segment in segments:
                self._check_fit(layer, segment, model.tensors[segment.key], where)
                self.changes[segment.key].append((layer, segment))
        if unmatched:
            shown = ", ".join(layer.down for layer in unmatched[:SHOWN])
            raise WeightmixError(
                f"{where}: {count(len(unmatched), 'LoRA layer')} of {len(layers)} match no"
                f" layer of the model ({model.path}), e.g. {shown}: is the LoRA for another"
                " architecture or text encoder?"
            )
        tensors = {}
        for key, info in model.tensors.items():
            kind = dtype if info.dtype.is_float else info.dtype
            tensors[key] = TensorInfo(
                key, kind, info.shape, lora.path, -1, info.numel * kind.itemsize
            )
        super().__init__(lora.path, tensors, lora.files)
        self.layers = layers
        self.notes = [
            f"{self.format} LoRA: {count(len(layers), 'layer')} change"
            f" {count(len(self.changes), 'tensor')} of the model; the rest add zero"
        ]
        self._scales: dict[str, float] = {}

    @staticmethod
    def _check_fit(layer: LoraLayer, segment: Segment, info: TensorInfo, where: str) -> None:
        row = math.prod(info.shape[1:])
        if layer.out_features != segment.rows or layer.in_features != row:
            raise WeightmixError(
                f"{where}: {layer.down}: a {layer.out_features} × {layer.in_features} update, but"
                f" {segment.key} is {list(info.shape)}"
                + (f" (its rows {segment.start}-{segment.stop} of"
                   f" {segment.rows})" if segment.rows != info.shape[0] else "")
                + ": the LoRA is for another model"
            )  # fmt: skip

    @property
    def metadata(self) -> dict[str, str]:
        return self.lora.metadata

    def scale(self, layer: LoraLayer) -> float:
        """alpha / rank (alpha = rank when the file has none)."""
        if layer.down not in self._scales:
            alpha = layer.alpha_value if layer.alpha_value is not None else layer.rank
            if layer.alpha is not None:
                alpha = float(self.lora.read(self.lora.tensors[layer.alpha]).double().item())
            self._scales[layer.down] = alpha / layer.rank
        return self._scales[layer.down]

    def factors(self, layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor]:
        """(up, down) in the update's dtype: out × rank and rank × in (flattened)."""
        kind = self.dtype.torch
        up = self.lora.read(self.lora.tensors[layer.up]).to(kind).reshape(layer.out_features, -1)
        down = self.lora.read(self.lora.tensors[layer.down]).to(kind)
        return up, down.reshape(layer.rank, -1)

    def rows(self, key: str, first: int, last: int) -> torch.Tensor:
        """Rows [first, last) of the delta of `key`, in the update's dtype, flattened."""
        info = self.tensors[key]
        out = torch.zeros((last - first, math.prod(info.shape[1:])), dtype=self.dtype.torch)
        for layer, segment in self.changes.get(key, []):
            start, stop = max(first, segment.start), min(last, segment.stop)
            if start >= stop:
                continue
            up, down = self.factors(layer)
            offset = segment.from_start + start - segment.start
            block = up[offset : offset + stop - start] @ down
            out[start - first : stop - first] += block * self.scale(layer)
        return out

    def reads_cheaply(self, info: TensorInfo) -> bool:
        return info.key not in self.changes  # each read of a changed key computes up @ down

    def read_range(self, info: TensorInfo, start: int, out) -> None:
        buffer = np.frombuffer(memoryview(out).cast("B"), dtype=np.uint8)
        buffer[:] = 0
        if info.key not in self.changes or not buffer.size:
            return
        row_bytes = math.prod(info.shape[1:]) * self.dtype.itemsize
        first, last = start // row_bytes, -(-(start + buffer.size) // row_bytes)
        delta = self.rows(info.key, first, last).reshape(-1).view(torch.uint8).numpy()
        begin = start - first * row_bytes
        buffer[:] = delta[begin : begin + buffer.size]

    def fingerprint_parts(self):
        return self.lora.fingerprint_parts()

    def close(self) -> None:
        self.lora.close()
