"""Faults while writing (issue 11): a second run on the same output, runs killed with SIGKILL,
and disks that fill up part way through a write, tested for real (other processes, a small
tmpfs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import folder_listing, load

from weightmix import api
from weightmix.errors import WeightmixError
from weightmix.io.locks import lock_path

HOLD_LOCK = """
import sys, time
from pathlib import Path
from weightmix.io.locks import DestinationLock
lock = DestinationLock(Path(sys.argv[1]))
print("held", flush=True)
time.sleep(60)
"""

KILLED_WRITER = """
import os, signal, sys, torch
from pathlib import Path
from weightmix.io.dtypes import dtype_from_name
from weightmix.io.writer import OutputTensor, open_output
fp32 = dtype_from_name("fp32")
layout = [OutputTensor(f"k{i}", fp32, (256,)) for i in range(8)]
writer = open_output(Path(sys.argv[1]), layout, {}, max_shard_bytes=int(sys.argv[2]) or None)
writer.write("k0", torch.ones(256))
os.kill(os.getpid(), signal.SIGKILL)
"""


def python(code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True
    )


def test_a_second_run_on_the_same_output_is_refused(run, tmp_path, models):
    out = tmp_path / "out.safetensors"
    holder = python(HOLD_LOCK, out)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = run("merge", models["A"], models["B"], "-o", out)
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1
        assert "is being written by another weightmix run" in result.err
        assert f"(process {holder.pid})" in result.err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died without cleaning up: its lock file no longer stops anyone
    assert lock_path(out).exists()
    result = run("merge", models["A"], models["B"], "-o", out, "-q")
    assert result.code == 0, result.err
    assert not lock_path(out).exists() and out.exists()


@pytest.mark.parametrize("shard_bytes", [0, 2048])
def test_a_killed_run_leaves_nothing_the_next_run_keeps(run, tmp_path, models, shard_bytes):
    """SIGKILL mid-write: nothing at the destination, inputs untouched; the next run writing
    to the folder removes the hidden temporary files and says so."""
    before = {name: path.read_bytes() for name, path in models.items()}
    out = tmp_path / "out.safetensors"
    killed = python(KILLED_WRITER, out, shard_bytes)
    killed.wait()
    assert killed.returncode == -9
    left = [n for n in folder_listing(tmp_path) if n.startswith(".out")]
    assert any(n.endswith(".partial") for n in left)  # the killed run's temporary files
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing visible
    live = python(HOLD_LOCK, tmp_path / "other.safetensors")  # another run, still writing
    try:
        assert live.stdout.readline().strip() == "held"
        result = run("merge", models["A"], models["B"], "-o", tmp_path / "merged.safetensors")
        assert result.code == 0, result.err
        assert f"removed {len(left)} temporary file(s) an interrupted run left" in result.err
        listing = folder_listing(tmp_path)
        assert not [n for n in listing if n.startswith(".out")]
        assert ".other.safetensors.weightmix-lock" in listing  # a live run's lock stays
    finally:
        live.kill()
        live.wait()
    assert {name: path.read_bytes() for name, path in models.items()} == before


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs: a real file system that fills up."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(disk: Path, leave: int) -> None:
    """Fill the disk with a hidden-free filler file until `leave` bytes are free."""
    stats = os.statvfs(disk)
    free = stats.f_bavail * stats.f_frsize
    with open(disk / "filler", "wb") as handle:
        handle.write(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("shard_bytes", [None, "64KB"])
@pytest.mark.parametrize("leave", [0, 4096, 100_000, 300_000])
def test_a_disk_that_fills_during_the_write(small_disk, models, shard_bytes, leave):
    """The plan saw room; the disk then fills before or while the output is written: one line
    naming the folder and the bytes needed, and nothing left on the disk but the filler."""
    recipe = {
        "models": {"a": str(models["A"]), "b": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.5},
    }
    if shard_bytes:
        recipe["max_shard_size"] = shard_bytes
    planned = api.make_plan(recipe, small_disk / "out.safetensors")
    fill(small_disk, leave)
    with pytest.raises(WeightmixError) as caught:
        api.execute(planned)
    message = str(caught.value)
    assert "\n" not in message
    assert f"the disk is full in {small_disk}" in message
    needed = int(re.search(r"\((\d+) bytes\)", message).group(1))
    assert needed >= planned.output_bytes  # the data plus the headers
    assert folder_listing(small_disk) == ["filler"]


def test_no_room_at_all_is_refused_before_writing(run, small_disk, models):
    fill(small_disk, 0)
    result = run("merge", models["A"], models["B"], "-o", small_disk / "out.safetensors")
    assert result.code == 2 and "needs" in result.err and "free" in result.err
    assert folder_listing(small_disk) == ["filler"]


def test_the_file_size_limit_is_one_line(tmp_path, models):
    """RLIMIT_FSIZE (EFBIG), in a child process so the limit stays there."""
    code = (
        "import resource, sys\n"
        "from weightmix.cli import main\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out.safetensors"
    args = ["merge", models["A"], models["B"], "-o", out]
    done = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 2, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    assert "largest file size" in done.stderr and "ulimit -f" in done.stderr
    assert not out.exists()
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".out")]
    assert load(models["A"])  # inputs still read


def test_lock_is_released_for_the_next_run(tmp_path, models):
    out = tmp_path / "out.safetensors"
    recipe = {"models": {"a": str(models["A"])}, "merge": "a"}
    for _ in range(3):
        api.merge(recipe, out, overwrite=True)
    assert folder_listing(tmp_path) == sorted(["A.safetensors", "B.safetensors",
                                               "C.safetensors", "out.safetensors"])  # fmt: skip


def plan_of(models: dict[str, Path], out: Path):
    recipe = {
        "models": {"a": str(models["A"]), "b": str(models["B"])},
        "merge": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 0.5},
    }
    return api.make_plan(recipe, out)


@pytest.mark.parametrize("change", ["replaced", "truncated", "rewritten"])
def test_an_input_that_changes_during_the_merge_is_named(tmp_path, models, change):
    """The file read must be the file planned with: replaced (renamed over), truncated, or
    rewritten in place (same size, new modification time) between planning and reading."""
    out = tmp_path / "out.safetensors"
    planned = plan_of(models, out)
    path = models["B"]
    if change == "replaced":
        other = tmp_path / "other.safetensors"
        other.write_bytes(models["C"].read_bytes())
        os.replace(other, path)
    elif change == "truncated":
        os.truncate(path, path.stat().st_size - 1000)
    else:
        data = path.read_bytes()
        path.write_bytes(data)
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    with pytest.raises(WeightmixError) as caught:
        api.execute(planned)
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and "while it was being read" in message
    words = {"replaced": "replaced by another file", "truncated": "changed size",
             "rewritten": "was rewritten"}  # fmt: skip
    assert words[change] in message
    assert not out.exists() and not [n for n in folder_listing(tmp_path) if n.startswith(".out")]


def test_an_input_rewritten_after_it_was_read_is_caught_before_the_output_lands(tmp_path, models):
    """Rewritten while its descriptor is open (reads would not notice): found by the check
    that runs once every read is done, before the output is moved into place."""
    from weightmix import engine
    from weightmix.progress import Progress
    from weightmix.provenance import build_metadata

    class TouchEachStep(Progress):
        def advance(self, nbytes: int, tensor_done: bool = False) -> None:
            stamp = models["A"].stat()
            os.utime(models["A"], ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1))

    out = tmp_path / "out.safetensors"
    planned = plan_of(models, out)
    try:
        with pytest.raises(WeightmixError, match=r"A\.safetensors: was rewritten"):
            engine.run(planned, build_metadata(planned), threads=1, progress=TouchEachStep())
    finally:
        planned.close()
    assert not out.exists() and not [n for n in folder_listing(tmp_path) if n.startswith(".out")]


def test_the_sweep_touches_only_weightmix_temporaries_and_never_on_a_dry_run(run, tmp_path, models):
    own = [tmp_path / ".bashrc.20240101.old", tmp_path / ".notes.abcdefgh.partial"]
    for path in own:
        path.write_text("mine")
    (tmp_path / ".project.backup_1.old").mkdir()
    (tmp_path / ".project.backup_1.old" / "thesis.tex").write_text("mine")
    stale = tmp_path / ".out.safetensors.weightmix-abcdefgh.partial"  # nobody holds it
    stale.write_bytes(b"\0" * 100)
    out = tmp_path / "merged.safetensors"
    result = run("merge", models["A"], models["B"], "-o", out, "--dry-run")
    assert result.code == 0 and stale.exists()  # a dry run changes nothing
    result = run("merge", models["A"], models["B"], "-o", out)
    assert result.code == 0 and not stale.exists()
    assert "removed 1 temporary file(s)" in result.err
    assert all(path.read_text() == "mine" for path in own)
    assert (tmp_path / ".project.backup_1.old" / "thesis.tex").read_text() == "mine"


def test_a_model_folder_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path):
    """Killed between moving the previous output aside and moving the new one in: the next
    run puts the previous one back rather than deleting it."""
    from weightmix.io.locks import sweep_stale

    aside = tmp_path / ".fold.weightmix-abcdefgh.old"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "model_index.json").write_text("{}")
    done = sweep_stale(tmp_path)
    assert done == [".fold.weightmix-abcdefgh.old (put back as fold)"]
    assert (tmp_path / "fold" / "model_index.json").read_text() == "{}"
    assert folder_listing(tmp_path) == ["fold"]


def test_an_output_written_after_planning_is_not_replaced_without_overwrite(tmp_path, models):
    """Another run finished the same output after this one was planned: checked again under
    the destination lock, so it is kept unless --overwrite was given."""
    out = tmp_path / "out.safetensors"
    planned = plan_of(models, out)
    out.write_bytes(b"another run's output")
    with pytest.raises(WeightmixError, match="exists \\(written since this merge was planned\\)"):
        api.execute(planned)
    assert out.read_bytes() == b"another run's output"
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".out")]


KILLED_BETWEEN_RENAMES = """
import os, signal, sys
from weightmix import api
from weightmix.io import writer
renames = 0
real = os.replace
def replace(source, target):
    global renames
    renames += 1
    if renames > 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(source, target)
writer.os.replace = replace
recipe = {"models": {"a": sys.argv[1], "b": sys.argv[2]}, "max_shard_size": "64KB",
          "merge": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 1.0}}
api.merge(recipe, sys.argv[3], overwrite=True)
"""


def test_a_kill_between_the_renames_of_a_sharded_overwrite_leaves_no_mixed_set(
    run, tmp_path, models
):
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], models["B"], "--alpha", "0", "--max-shard-size", "64KB",
                 "-o", out, "-q")  # fmt: skip
    assert result.code == 0, result.err
    index = tmp_path / "out.safetensors.index.json"
    killed = python(KILLED_BETWEEN_RENAMES, models["A"], models["B"], out)
    killed.wait()
    assert killed.returncode == -9
    # two new shards are in place and the rest are old: no index may present them as one set
    assert not index.exists()
    result = run("inspect", index)
    assert result.code == 2
