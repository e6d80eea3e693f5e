"""Per-tensor selection without a full sort: the k largest magnitudes of a tensor, exactly,
ties at the cut broken by lower index.

A float32 magnitude's bit pattern, read as an integer, orders like the value, so the k-th
largest magnitude is found by a radix select: a histogram of the top 16 bits (one pass) names
the bucket holding it, and only that bucket's elements (a few thousandths of the tensor for
real weights) are sorted out. A full sort or quantile costs 10-20x more on this machine.
"""

from __future__ import annotations

import math

import torch

from weightmix import kernels

Tensor = torch.Tensor
_BUCKETS = 1 << 15  # top 16 bits of a non-negative float32 (the sign bit is 0)
KEPT_AT_MOST = 1 << 20  # bit patterns a cut keeps aside in its first pass (4 MB)


def kth_largest_magnitude(values: Tensor, k: int) -> Tensor:
    """The k-th largest |value| (1 <= k <= numel), as a 0-d tensor (float32; float64 for
    float64 values, selected directly)."""
    if values.dtype == torch.float64:
        flat = values.detach().abs().reshape(-1)
        return flat.kthvalue(flat.numel() - k + 1).values
    magnitudes = values.detach().float().abs().reshape(-1)
    bits = magnitudes.view(torch.int32)
    high = bits >> 16
    counts = torch.bincount(high, minlength=_BUCKETS)
    from_top = counts.flip(0).cumsum(0)
    wanted = torch.tensor(k, dtype=from_top.dtype, device=from_top.device)
    position = int(torch.searchsorted(from_top, wanted))
    bucket = _BUCKETS - 1 - position
    above = int(from_top[position - 1]) if position > 0 else 0
    inside = magnitudes[high == bucket]
    need = k - above  # the need-th largest of the bucket
    return inside.kthvalue(inside.numel() - need + 1).values


def top_magnitude_mask(values: Tensor, k: int) -> Tensor:
    """A bool mask of the k elements of largest magnitude (k >= 1); among equal magnitudes at
    the cut, the lower flat indices are kept, so exactly k elements are True."""
    n = values.numel()
    if k >= n:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = kth_largest_magnitude(values, k)
    magnitudes = values.abs()
    keep = magnitudes > threshold
    at_cut = magnitudes == threshold
    need = k - int(keep.sum())
    if int(at_cut.sum()) > need:  # ties at the cut: the first `need` of them by index
        flat = at_cut.reshape(-1)
        order = flat.cumsum(0, dtype=torch.int64)
        at_cut = (flat & (order <= need)).reshape(values.shape)
    return keep | at_cut


class StreamedTopK:
    """The k largest magnitudes of a tensor seen chunk by chunk (k >= 1), exactly, with the
    whole-tensor rule: ties at the cut go to the lower indices.

    Statistics passes run a radix select over the magnitude's bit pattern, 16 bits a pass
    (two passes for float32, four for float64): each pass counts the next 16 bits of the
    elements whose higher bits match the cut found so far. After them the cut is the exact k-th
    largest magnitude, and `mask` (called on the chunks in element order) keeps everything
    above it and the first `need` elements equal to it.

    Where the C loops take the chunks, the first pass also keeps aside the bit patterns whose
    top 16 bits lie in a window around where the first chunk puts the cut (an eighth of the
    tensor at most, and at most KEPT_AT_MOST): when the cut's top bits fall inside it, the
    second stage counts those instead of passing over the data again (the same counts).

    Given a sample of the tensor first (`sample_delta`, then `end_sample`: pieces spread over
    it, which place the window better than its first chunk), the first pass makes no
    histogram: it keeps the window's patterns aside and counts those above it. When the cut
    lies inside the window (more than `above` and at most `above` + kept elements reach it),
    the stage 0 counts that matter follow from those: the same cut. Otherwise another pass
    makes the histogram as above."""

    def __init__(self, k: int, numel: int, dtype: torch.dtype) -> None:
        self.k, self.numel, self.dtype = k, numel, dtype  # dtype: of the deltas (compute)
        self.keep_all = k >= numel
        wide = dtype == torch.float64
        self.float_dtype = torch.float64 if wide else torch.float32
        self.int_dtype = torch.int64 if wide else torch.int32
        self.shifts = (48, 32, 16, 0) if wide else (16, 0)
        self.stage = 0
        self.prefix = 0  # the cut's bits found so far
        self.above = 0  # elements known to be above the cut
        self.counts: Tensor | None = None
        self.threshold: Tensor | None = None
        self.need = 0  # elements equal to the cut to keep
        self.ties = 0  # elements equal to the cut
        self.taken = 0  # of those, kept in the chunks seen so far
        self.window = (0, -1)  # top 16 bits of the patterns kept aside
        self.kept: Tensor | None = None  # those patterns, in index order
        self.filled = 0
        self.sample: Tensor | None = None  # stage 0 counts of a sample (sample_delta)
        self.sampled = 0  # elements in it
        self.counting = False  # a first pass without a histogram: kept aside and `higher`
        self.higher = 0  # elements above the window (counting)

    def wants_pass(self) -> bool:
        return not self.keep_all and self.threshold is None

    def sample_delta(self, base: Tensor, model: Tensor) -> None:
        """Count a piece of model − base (float32, before the first pass) into the sample that
        places the window; not taken where the C loops do not take it."""
        if self.keep_all or self.stage or self.dtype != torch.float32:
            return
        counts = self.sample if self.sample is not None else torch.zeros(1 << 16, dtype=torch.int64)
        if kernels.magnitude_histogram(base, model, 0, 0, counts):
            self.sample = counts
            self.sampled += base.numel()

    def end_sample(self) -> None:
        """Place the window where the sample puts the cut, for a first pass that keeps the
        patterns in it aside and counts those above it, without a histogram."""
        if self.sample is None or self.sampled == 0:
            return
        sample, self.sample = self.sample, None
        room = min(self.numel // 8, KEPT_AT_MOST)
        if room < 1:
            return
        low, high = self._window(sample, self.sampled, room)
        expected = int(sample[low : high + 1].sum()) * self.numel / self.sampled
        if expected > 0.75 * room:  # magnitudes on few values: the window would overflow
            return  # (the first pass makes its histogram, as without a sample)
        self.window = low, high
        self.kept, self.counting = torch.empty(room, dtype=torch.int32), True

    def _window(self, counts: Tensor, seen: int, room: int) -> tuple[int, int]:
        """The top 16 bits holding the cut's share of `seen` elements counted in `counts`,
        widened by a share on either side that should fill half the room."""
        spread = room / (4 * self.numel)
        from_top = counts.flip(0).cumsum(0)

        def bucket_at(share: float) -> int:
            rank = min(max(math.ceil(share * seen), 1), seen)
            wanted = torch.tensor(rank, dtype=from_top.dtype, device=from_top.device)
            return (1 << 16) - 1 - int(torch.searchsorted(from_top, wanted))

        share = self.k / self.numel
        # a share past either end reaches the end of the range: the top (or bottom) of the
        # tensor may hold magnitudes the counted elements do not
        low = 0 if share + spread >= 1 else bucket_at(share + spread)
        high = (1 << 15) - 1 if share - spread <= 0 else bucket_at(share - spread)
        return low, high

    def observe_delta(self, base: Tensor, model: Tensor) -> None:
        """observe(model − base), the difference taken in the compute dtype; fused in C where
        kernels.magnitude_histogram takes the chunks (a float32 difference)."""
        if self.counting:  # (a full room or a chunk C does not take: kept is None, and
            if self.kept is not None:  # end_pass asks for a pass with a histogram)
                self._keep_aside(base, model, None)
            return
        if self.dtype == torch.float32 and base.numel() < self.numel:
            first = self.counts is None
            if first:
                self.counts = torch.zeros(1 << 16, dtype=torch.int64)
            if self.kept is not None and self._keep_aside(base, model, self.counts):
                return
            if kernels.magnitude_histogram(base, model, self.stage, self.prefix, self.counts):
                if first and self.stage == 0:
                    self._start_keeping(base, model)
                return
        self.observe(model.to(self.dtype) - base.to(self.dtype))

    def _start_keeping(self, base: Tensor, model: Tensor) -> None:
        """After the first chunk's counts: the window of top 16 bits that holds the cut's
        share of that chunk, widened by a share on either side that should fill half the
        room; then the first chunk's patterns in it."""
        room = min(self.numel // 8, KEPT_AT_MOST)  # (float32 patterns: stages 16 and 0)
        if room < 1:
            return
        assert self.counts is not None
        self.window = self._window(self.counts, base.numel(), room)
        self.kept = torch.empty(room, dtype=torch.int32)
        self._keep_aside(base, model, None)

    def _keep_aside(self, base: Tensor, model: Tensor, counts: Tensor | None) -> bool:
        """The chunk's patterns in the window appended to `kept` (and its stage 0 counts
        added, unless counts is None); False: not taken (nothing kept from now on)."""
        assert self.kept is not None
        into = self.kept[self.filled :]
        found = kernels.magnitude_collect(base, model, counts, self.window, into)
        if found is None or found[0] >= into.numel():  # no room left: the second pass counts
            self.kept = None
            return found is not None
        self.filled += found[0]
        self.higher += found[1]
        return True

    def _stop_counting(self) -> None:
        """Give up the pass without a histogram: the next first pass makes one."""
        self.counting, self.kept, self.filled, self.higher = False, None, 0, 0
        self.window = (0, -1)

    def _counts_from_kept(self) -> Tensor | None:
        """After a pass without a histogram: stage 0 counts that place the cut as the full
        histogram does (the window's buckets from the patterns kept aside, the elements above
        it in the bucket just above), when the cut lies inside the window and every pattern
        there was kept; else None."""
        if self.kept is None or not self.higher < self.k <= self.higher + self.filled:
            return None
        counts = torch.bincount(self.kept[: self.filled] >> 16, minlength=1 << 16)
        counts[self.window[1] + 1] += self.higher  # top bits stay below 2^15: in range
        return counts

    def chunk_cut(self) -> kernels.Cut:
        """The next chunk's mask for kernels.ties_chunk (which reports back through `took`)."""
        if self.keep_all:
            return kernels.KEEP_ALL, 0.0, 0
        assert self.threshold is not None
        if self.taken >= self.need:
            return kernels.ABOVE, float(self.threshold), 0
        if self.ties == self.need:
            return kernels.AT_LEAST, float(self.threshold), 0
        return kernels.FIRST_AT_CUT, float(self.threshold), self.need - self.taken

    def took(self, count: int) -> None:
        """The chunk's mask kept `count` elements at the cut (FIRST_AT_CUT)."""
        self.taken += count

    def _magnitudes(self, values: Tensor) -> Tensor:
        return values.reshape(-1).to(self.float_dtype).abs()

    def _bits(self, values: Tensor) -> Tensor:
        """The magnitudes' bit patterns, every NaN as the one quiet NaN (a NaN's payload
        depends on which operand it came from and on torch's code path, not on the data)."""
        bits = self._magnitudes(values).view(self.int_dtype)
        wide = self.int_dtype == torch.int64
        infinity = 0x7FF0000000000000 if wide else 0x7F800000
        if bits.numel() and int(bits.max()) > infinity:
            quiet = 0x7FF8000000000000 if wide else 0x7FC00000
            bits = torch.where(bits > infinity, quiet, bits)
        return bits

    def observe(self, values: Tensor) -> None:
        bits = self._bits(values)
        if self.stage == 0 and bits.numel() == self.numel:  # the whole tensor in one chunk
            self._select(bits)
            return
        shift = self.shifts[self.stage]
        if self.stage == 0:
            fields = bits >> shift  # the sign bit is 0: fields run 0 .. 2^15 - 1
        else:  # the next 16 bits of the elements under the cut so far, shifted by one; the
            # others counted in bins 0 and 2^16 + 1 (integer arithmetic: faster than masks)
            fields = ((bits >> shift) - (self.prefix << 16)).clamp_(-1, 1 << 16).add_(1)
        counts = torch.bincount(fields, minlength=(1 << 16) + (2 if self.stage else 0))
        if self.stage:
            counts = counts[1 : (1 << 16) + 1]
        self._add(counts)

    def _add(self, counts: Tensor) -> None:
        if self.counts is None:
            self.counts = counts
        else:
            self.counts += counts

    def _select(self, bits: Tensor) -> None:
        """The cut from all the bit patterns at once: what the radix passes find, in one."""
        cut = bits.kthvalue(bits.numel() - self.k + 1).values  # the k-th largest
        self.above = int((bits > cut).sum())
        self.ties = int((bits == cut).sum())
        self.need = self.k - self.above
        self.threshold = cut.reshape(1).view(self.float_dtype)[0]
        self.stage = len(self.shifts)

    def end_pass(self) -> None:
        if self.threshold is not None:  # settled whole by _select
            return
        if self.counting:
            found = self._counts_from_kept()
            if found is None:  # the cut lies outside the window: a pass with a histogram
                self._stop_counting()
                return
            self.counting, self.counts = False, found
        counts = self.counts if self.counts is not None else torch.zeros(1 << 16, dtype=torch.int64)
        from_top = counts.flip(0).cumsum(0)
        wanted = torch.tensor(self.k - self.above, dtype=from_top.dtype, device=from_top.device)
        position = int(torch.searchsorted(from_top, wanted))
        self.above += int(from_top[position - 1]) if position > 0 else 0
        self.prefix = (self.prefix << 16) | ((1 << 16) - 1 - position)
        self.counts, self.stage = None, self.stage + 1
        if self.stage == len(self.shifts):
            pattern = torch.tensor([self.prefix], dtype=self.int_dtype)
            self.threshold = pattern.view(self.float_dtype)[0]
            self.need = self.k - self.above
            self.ties = int(counts[(1 << 16) - 1 - position])  # elements equal to the cut
        kept, self.kept = self.kept, None
        if kept is not None and self.window[0] <= self.prefix <= self.window[1]:
            # every pattern under the cut's top bits was kept aside: the second stage's counts
            bits = kept[: self.filled]
            self.counts = torch.bincount(
                bits[(bits >> 16) == self.prefix] & 0xFFFF, minlength=1 << 16
            )
            self.end_pass()

    def mask(self, values: Tensor) -> Tensor | None:
        """The chunk's elements among the k largest as 1, the others as 0, in the dtype of
        `values` (None: all of them). Float arithmetic, not bool masks: several times faster
        on CPUs (sign(relu(|v| − cut)) is 1 exactly where |v| > cut)."""
        if self.keep_all:
            return None
        magnitudes = values.to(self.float_dtype).abs()
        above = torch.sign(torch.relu(magnitudes - self.threshold))
        if self.taken >= self.need:
            return above.to(values.dtype)
        if self.ties == self.need:  # every element at the cut is kept: |v| >= cut
            return (1 - torch.sign(torch.relu(self.threshold - magnitudes))).to(values.dtype)
        at_cut = magnitudes == self.threshold
        count = int(at_cut.sum())
        if self.taken + count > self.need:  # the cut ends inside this chunk
            order = at_cut.reshape(-1).cumsum(0, dtype=torch.int64)
            at_cut &= (order <= self.need - self.taken).reshape(at_cut.shape)
            count = self.need - self.taken
        self.taken += count
        return above.add_(at_cut).to(values.dtype)
