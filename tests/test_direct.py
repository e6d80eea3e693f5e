"""Big outputs written with O_DIRECT (weightmix/io/direct.py): any order of writes, any
alignment, gives the bytes a buffered write gives; a file system that refuses falls back."""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
from pathlib import Path

import pytest
import torch
from helpers import load

from weightmix import api, engine
from weightmix.io import direct
from weightmix.io.writer import _TempFile

BLOCK = direct.BLOCK


def pieces(size: int, rng: random.Random) -> list[tuple[int, int]]:
    """[start, stop) ranges that tile [0, size): tiny, block-sized and odd, and longer than
    the staging buffer (set small by the tests), in a shuffled order."""
    ranges, start = [], 0
    while start < size:
        length = rng.choice([1, 2, 7, BLOCK - 1, BLOCK, BLOCK + 3, 3 * BLOCK, 5 * BLOCK + 11])
        ranges.append((start, min(size, start + length)))
        start += length
    rng.shuffle(ranges)
    return ranges


def direct_calls(monkeypatch) -> list[tuple[int, int]]:
    """Record (offset, length) of every pwrite made while the file has O_DIRECT on."""
    calls: list[tuple[int, int]] = []
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            calls.append((offset, memoryview(data).nbytes))
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    return calls


def pair_recipe(models, **extra) -> dict:
    """A weighted sum of the tiny models A and B."""
    return {
        "models": {"a": str(models["A"]), "b": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.3},
        **extra,
    }


def merged_both_ways(recipe, tmp_path, monkeypatch, **flags) -> dict[str, dict[str, bytes]]:
    """The files a merge writes buffered ("0") and direct ("1"), by name, each in its own
    folder under the same output name."""
    outputs = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(direct.SWITCH, switch)
        folder = tmp_path / f"direct{switch}"
        folder.mkdir()
        api.merge(recipe, folder / "out.safetensors", **flags)
        outputs[switch] = {p.name: p.read_bytes() for p in sorted(folder.iterdir())}
    return outputs


@pytest.mark.parametrize("size", [1, BLOCK - 5, BLOCK, 17 * BLOCK, 40 * BLOCK + 123])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_writes_in_any_order_and_alignment_give_the_bytes(tmp_path, monkeypatch, size, seed):
    monkeypatch.setattr(direct, "STAGE_BYTES", 3 * BLOCK)  # many stagings per long write
    calls = direct_calls(monkeypatch)
    rng = random.Random(seed)
    expected = rng.randbytes(size)
    file = _TempFile(tmp_path / "out.safetensors", size, direct=True)
    assert file._direct is not None and file._direct.direct  # this file system takes O_DIRECT
    for start, stop in pieces(size, rng):
        file.write_at(expected[start:stop], start)
    file.finish()
    assert not file._direct._waiting and not file._direct._runs  # all written
    file.close(fsync=False)
    assert file.temp.read_bytes() == expected
    assert file.temp.stat().st_size == size
    # every direct write whole aligned blocks; only the last partial block went buffered
    assert all(offset % BLOCK == 0 and length % BLOCK == 0 for offset, length in calls)
    assert sum(length for _, length in calls) == size // BLOCK * BLOCK


def test_a_file_system_that_refuses_direct_writes_gets_them_buffered(tmp_path, monkeypatch):
    """Where the open takes O_DIRECT but a write does not (EINVAL), the writes go through the
    page cache from then on, the same bytes."""
    real = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(direct.os, "pwrite", pwrite)
    rng = random.Random(5)
    size = 9 * BLOCK + 77
    expected = rng.randbytes(size)
    file = _TempFile(tmp_path / "out.safetensors", size, direct=True)
    for start, stop in pieces(size, rng):
        file.write_at(expected[start:stop], start)
    file.finish()
    assert not file._direct.direct
    file.close(fsync=False)
    assert file.temp.read_bytes() == expected


def test_the_switch_and_the_kernels_dirty_room_decide(monkeypatch):
    """WEIGHTMIX_DIRECT_WRITES=1/0 forces it; otherwise an output goes direct when it passes
    midway between vm.dirty_background and vm.dirty (ratios of available memory here)."""
    monkeypatch.setenv(direct.SWITCH, "1")
    assert direct.wants_direct(1)
    monkeypatch.setenv(direct.SWITCH, "0")
    assert not direct.wants_direct(1 << 50)
    monkeypatch.delenv(direct.SWITCH)
    room = direct.dirty_room()
    vm = Path("/proc/sys/vm")
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    ratios = [int((vm / f"{n}_ratio").read_text()) for n in ("dirty_background", "dirty")]
    assert int((vm / "dirty_bytes").read_text()) == 0  # this machine sets ratios
    assert 0 < room <= sum(ratios) / 2 / 100 * total  # of available memory, at most all of it
    assert direct.wants_direct(room + 1) and not direct.wants_direct(room)


@pytest.mark.parametrize("shard", [None, "64KB"])
def test_a_merge_written_direct_equals_one_written_buffered(tmp_path, models, monkeypatch, shard):
    recipe = {
        "models": {name.lower(): str(path) for name, path in models.items()},
        "merge": {"method": "add_difference", "inputs": ["a", "b", "c"], "alpha": 0.7},
    }
    if shard:
        recipe["max_shard_size"] = shard
    outputs = merged_both_ways(recipe, tmp_path, monkeypatch)
    assert outputs["0"] == outputs["1"]
    assert (len(outputs["1"]) > 2) == (shard is not None)  # shards and their index
    if shard is None:
        merged = load(tmp_path / "direct1" / "out.safetensors")
        a, b, c = (load(models[n]) for n in "ABC")
        for key, tensor in merged.items():
            if not tensor.is_floating_point():  # integer keys are copied from the first model
                assert tensor.equal(a[key]), key
                continue
            reference = a[key].float() + 0.7 * (b[key].float() - c[key].float())
            # (the method's own bits are tested in test_methods.py: here, a real merge)
            torch.testing.assert_close(tensor.float(), reference, rtol=2**-10, atol=2**-10)


def test_staging_memory_grows_with_threads_not_with_shards(tmp_path, models, monkeypatch):
    """Many direct-written shards on two workers: the staging buffers made stay within the
    writing threads (two workers and the main thread, which writes the headers) plus two,
    and the shards hold the bytes a buffered run writes."""
    stages = direct._Stages()
    monkeypatch.setattr(direct, "_STAGES", stages)
    monkeypatch.setattr(direct, "STAGE_BYTES", 4 * BLOCK)  # runs fill and turn over often
    recipe = pair_recipe(models, max_shard_size="2KB")
    outputs = merged_both_ways(recipe, tmp_path, monkeypatch, threads=2)
    assert outputs["0"] == outputs["1"]
    assert len(outputs["1"]) > 10  # shards (and their index)
    assert 0 < stages.most <= 3 + 2


def test_more_writing_threads_than_buffers_never_wait_forever(tmp_path):
    """Twelve threads each leave a run open (and stay alive) while the others want buffers:
    the set grows with the threads that write, so every write goes through."""
    size = 12 * 2 * BLOCK
    expected = random.Random(3).randbytes(size)
    file = _TempFile(tmp_path / "out.safetensors", size, direct=True)
    started, release = threading.Barrier(13), threading.Event()

    def writer(number: int) -> None:
        start = number * 2 * BLOCK
        file.write_at(expected[start : start + 2 * BLOCK], start)
        started.wait(timeout=30)
        release.wait(timeout=30)  # alive, its run still open, while the others write

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    started.wait(timeout=30)  # raises BrokenBarrierError if a writer is stuck
    release.set()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    file.finish()
    file.close(fsync=False)
    assert file.temp.read_bytes() == expected


def test_a_write_after_close_is_refused_and_reaches_no_other_file(tmp_path):
    """After close() (an abort) a late write raises, and nothing is written through the
    closed descriptor, even once another file has its number."""
    file = _TempFile(tmp_path / "out.safetensors", 2 * BLOCK, direct=True)
    writes = file._direct
    file.write_at(b"x" * 100, 0)  # waits for the rest of its block
    number = file.fd
    file.close(fsync=False)
    opened = os.open(tmp_path / "other", os.O_RDWR | os.O_CREAT)
    other = os.dup2(opened, number)  # another file takes the number
    os.close(opened)
    try:
        with pytest.raises(RuntimeError, match="after close"):
            writes.write(memoryview(b"y" * (BLOCK - 100)), 100)  # would complete block 0
        with pytest.raises(RuntimeError, match="after close"):
            writes.write(memoryview(b"z" * BLOCK), BLOCK)  # would start a run
    finally:
        os.close(other)
    assert (tmp_path / "other").read_bytes() == b""


def test_without_a_writer_thread_the_caller_writes(tmp_path, models, monkeypatch):
    """Where no thread can be started (a pids limit), the direct writes happen in the
    callers: the same bytes."""

    class NoThread:
        def put(self, *args):
            raise RuntimeError("can't start new thread")

    monkeypatch.setattr(direct, "_WRITER", NoThread())
    outputs = merged_both_ways(pair_recipe(models), tmp_path, monkeypatch)
    assert outputs["0"] == outputs["1"]


def test_the_memory_estimate_counts_the_staging_buffers(models, monkeypatch):
    """A direct-written output adds a staging buffer per worker, the main thread's and two
    more to the estimate."""
    planned = api.make_plan(pair_recipe(models))
    try:
        monkeypatch.setenv(direct.SWITCH, "0")
        buffered = engine.estimate_peak(planned, threads=2)
        monkeypatch.setenv(direct.SWITCH, "1")
        assert engine.estimate_peak(planned, threads=2) == buffered + 5 * direct.STAGE_BYTES
    finally:
        planned.close()
