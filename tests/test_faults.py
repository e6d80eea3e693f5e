"""Faults while writing (issue 11): a second run on the same output, runs killed with SIGKILL,
and disks that fill up part way through a write, tested for real (other processes, a small
tmpfs)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import folder_listing, load, save

from weightmix import api
from weightmix.errors import WeightmixError
from weightmix.io import open_checkpoint
from weightmix.io.locks import lock_path, sweep_stale

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
        assert f"(process {holder.pid})" in result.err  # from /proc/locks:
        assert lock_path(out).stat().st_size == 0  # no block to discard when it is removed
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


@pytest.mark.parametrize("direct_writes", ["0", "1"])
@pytest.mark.parametrize("shard_bytes", [None, "64KB"])
@pytest.mark.parametrize("leave", [0, 4096, 100_000, 300_000])
def test_a_disk_that_fills_during_the_write(
    small_disk, models, shard_bytes, leave, direct_writes, monkeypatch
):
    """The plan saw room; the disk then fills before or while the output is written: one line
    naming the folder and the bytes needed, and nothing left on the disk but the filler. The
    same through the page cache and past it (O_DIRECT, as big outputs are written)."""
    monkeypatch.setenv("WEIGHTMIX_DIRECT_WRITES", direct_writes)
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


@pytest.fixture
def few_inodes(tmp_path):
    """A tmpfs with room for data but only 40 inodes: a file system that runs out of files."""
    mount = tmp_path / "inodes"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,nr_inodes=40", "tmpfs", str(mount)],
        capture_output=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def use_inodes(disk: Path, leave: int) -> list[str]:
    """Create empty files until creating one fails, then remove `leave` of them."""
    made = []
    with contextlib.suppress(OSError):
        while True:
            (disk / f"f{len(made):03d}").touch()
            made.append(f"f{len(made):03d}")
    for name in made[len(made) - leave :] if leave else []:
        (disk / name).unlink()
    return sorted(made[: len(made) - leave])


@pytest.mark.parametrize("leave", range(6))
@pytest.mark.parametrize("command", ["single", "sharded", "lora", "hyper"])
def test_running_out_of_inodes_is_one_line(run, few_inodes, models, command, leave):
    """No inode left for the lock, a temporary file or folder, a shard, the journal or the
    spill file: one line and exit 2, and nothing new on the disk; or, with enough, success."""
    fillers = use_inodes(few_inodes, leave)
    out = few_inodes / "out.safetensors"
    args = {
        "single": ["merge", models["A"], models["B"], "-o", out],
        "sharded": ["merge", models["A"], models["B"], "-o", out, "--max-shard-size", "64KB"],
        "lora": ["lora", "extract", models["A"], models["B"], "-o", out, "--rank", "2"],
    }
    if command == "hyper":
        config = models["A"].parent / "config.yaml"
        settings = {"name": "toy", "models": [str(models[n]) for n in "ABC"], "iterations": 2,
                    "ranks": [1], "output": str(few_inodes)}  # fmt: skip
        config.write_text(json.dumps(settings))
        args["hyper"] = ["hyper", config]
    result = run(*args[command], "-q")
    if result.code == 0:
        assert len(folder_listing(few_inodes)) > len(fillers)
        return
    assert result.code == 2, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("weightmix: error:"), result.err
    assert "No space left on device" in lines[0] or "have room" in lines[0], lines[0]
    assert folder_listing(few_inodes) == fillers


@pytest.mark.parametrize("leave", [0, 3000, 30_000])
def test_a_lora_extract_on_a_full_disk_is_one_line(run, small_disk, models, leave):
    """The spill file of `lora extract` and its output fill the disk: one line, exit 2."""
    fill(small_disk, leave)
    out = small_disk / "lora.safetensors"
    result = run("lora", "extract", models["A"], models["B"], "-o", out, "--rank", "8", "-q")
    assert result.code == 2, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1 and f"the disk is full in {small_disk}" in lines[0], result.err
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
from weightmix.io import locks
renames = 0
real = locks.move_into_place
def move(source, target):
    global renames
    renames += 1
    if renames > 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real(source, target)
locks.move_into_place = move
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
    # the killed run's journal says which files were moving: the next run writing to the
    # folder removes both sets' pieces (proved by inode) and says so; nothing of `out` stays
    hidden = [n for n in folder_listing(tmp_path) if n.endswith(".commit")]
    assert len(hidden) == 1, folder_listing(tmp_path)
    # a plain rerun, no --overwrite: the pieces are swept before "exists" is checked
    result = run("merge", models["A"], models["B"], "--alpha", "0.5", "--max-shard-size", "64KB",
                 "-o", out)  # fmt: skip
    assert result.code == 0, result.err
    assert "left by a killed move into place" in result.err
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".")]
    with open_checkpoint(index) as checkpoint:  # the new set, whole: every shard it names
        assert len({info.file for info in checkpoint.tensors.values()}) > 1
        for info in checkpoint.tensors.values():
            checkpoint.read(info)


KILLED_AFTER_THE_LAST_RENAME = """
import os, signal, sys
from pathlib import Path
from weightmix.io import locks
from weightmix.io.dtypes import dtype_from_name
from weightmix.io.writer import OutputTensor, open_output
real = locks.Path.unlink
def unlink(self, missing_ok=False):
    if self.name == "out.safetensors":  # the new set is in place, the old file not yet gone
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, missing_ok=missing_ok)
locks.Path.unlink = unlink
fp32 = dtype_from_name("fp32")
layout = [OutputTensor(f"k{i}", fp32, (256,)) for i in range(8)]
import torch
writer = open_output(Path(sys.argv[1]), layout, {}, max_shard_bytes=int(sys.argv[2]) or None)
for i in range(8):
    writer.write(f"k{i}", torch.full((256,), float(i)))
writer.commit()
"""


def test_a_set_killed_before_its_clean_up_is_finished_by_the_next_run(tmp_path):
    """The new sharded set landed whole, the old single file was not yet removed: the next
    run removes the old file (its inode proves it is the old one) and keeps the new set."""
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old output in another layout")
    killed = python(KILLED_AFTER_THE_LAST_RENAME, out, 3000)
    killed.wait()
    assert killed.returncode == -9
    names = folder_listing(tmp_path)
    assert "out.safetensors" in names and "out.safetensors.index.json" in names
    swept = sweep_stale(tmp_path)
    journals = [w for w in swept if ".commit" in w]
    assert len(journals) == 1 and "(and out.safetensors, left by" in journals[0], swept
    names = folder_listing(tmp_path)
    assert "out.safetensors" not in names
    assert not [n for n in names if n.startswith(".")]
    with open_checkpoint(tmp_path / "out.safetensors.index.json") as checkpoint:
        firsts = [float(checkpoint.read(checkpoint.tensors[f"k{i}"])[0]) for i in range(8)]
    assert firsts == [float(i) for i in range(8)]


KILLED_HYPER = """
import os, signal, sys
from pathlib import Path
from weightmix.hyper.config import load_config
from weightmix.hyper.run import hyper_merge
from weightmix.io import locks
renames = 0
real = locks.move_into_place
def move(source, target):
    global renames
    if "weightmix" in Path(target).parent.name:  # inside the run's staging folder
        return real(source, target)
    renames += 1
    if renames > 2:  # the average and the first LoRA are in place, the rest not
        os.kill(os.getpid(), signal.SIGKILL)
    real(source, target)
settings, folder = load_config(Path(sys.argv[1]))
locks.move_into_place = move
hyper_merge(settings, folder, overwrite=True, progress=False)
"""


def test_a_hyper_merge_killed_while_moving_its_files_leaves_no_half_set(run, tmp_path):
    """Hyper-Merge moves five files into place one by one: a kill part way leaves the new
    average and LoRA beside the old multipliers; the next run writing to the folder removes
    the pieces of both sets, says so, and the set it writes is whole."""
    import yaml

    paths = []
    for m in range(3):
        state = {"w.weight": torch.full((4, 3), float(m)) + torch.eye(4, 3) * m * m}
        paths.append(save(tmp_path / f"model{m}.safetensors", state))
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "toy", "models": [str(p) for p in paths],
                                      "iterations": 2, "ranks": [1, 1]}))  # fmt: skip
    assert run("hyper", config, "-q").code == 0
    before = {n: (tmp_path / n).stat().st_ino for n in folder_listing(tmp_path) if "toy" in n}
    assert len(before) == 5
    killed = python(KILLED_HYPER, config)
    killed.wait()
    assert killed.returncode == -9
    left = [n for n in folder_listing(tmp_path) if n.startswith("toy")]
    assert "toy_multipliers.json" not in left  # the old set's marker went first
    result = run("hyper", config)
    assert result.code == 0, result.err
    assert "left by a killed move into place" in result.err, result.err
    after = [n for n in folder_listing(tmp_path) if "toy" in n]
    assert sorted(after) == sorted(before) and not any(n.startswith(".") for n in after)
    document = json.loads((tmp_path / "toy_multipliers.json").read_text())
    assert len(document["loras"]) == 2


def test_a_move_stopped_before_the_old_set_broke_keeps_the_old_set(tmp_path, monkeypatch):
    """A new sharded set replacing a single file stops after its first shard moved: the old
    file is still whole, so the sweep removes only the new set's piece (by inode)."""
    from weightmix.io import locks

    old = tmp_path / "out.safetensors"
    old.write_bytes(b"the old, whole output")
    moves = []
    for name in ("out-00001-of-00002.safetensors", "out-00002-of-00002.safetensors"):
        temp = tmp_path / f".{name}.weightmix-abcdefgh.partial"
        temp.write_bytes(name.encode())
        moves.append((temp, tmp_path / name))
    real, done = os.replace, []

    def replace(source, target):
        if done:
            raise OSError(5, "Input/output error")  # the second move fails
        done.append(target)
        real(source, target)

    monkeypatch.setattr(locks.os, "replace", replace)
    with pytest.raises(OSError):
        locks.replace_set(moves, [old], first=None)
    monkeypatch.undo()
    assert (tmp_path / "out-00001-of-00002.safetensors").exists()
    swept = sweep_stale(tmp_path)
    assert any("(and out-00001-of-00002.safetensors, left by" in w for w in swept), swept
    assert old.read_bytes() == b"the old, whole output"
    assert not (tmp_path / "out-00001-of-00002.safetensors").exists()


def folder_model(path: Path, scale: float) -> Path:
    path.mkdir()
    (path / "config.json").write_text("{}")
    save(path / "model.safetensors", {"w.weight": torch.eye(4, 3) * scale + scale})
    return path


def test_a_failed_hyper_overwrite_puts_the_earlier_average_folder_back(run, tmp_path, monkeypatch):
    """Folder models make a folder average: moved aside while the new set moves in, and put
    back, whole, when the move fails (a review found it deleted with the staging folder)."""
    from weightmix.hyper import run as hyper_run

    models = [folder_model(tmp_path / f"m{m}", m + 1.0) for m in range(3)]
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"name": "toy", "models": [str(p) for p in models],
                                  "iterations": 2, "ranks": [1], "output": "out"}))  # fmt: skip
    assert run("hyper", config, "-q").code == 0
    average = tmp_path / "out" / "toy_average"
    before = {p.relative_to(average): p.read_bytes() for p in average.rglob("*") if p.is_file()}
    assert before

    def no_room(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hyper_run, "replace_set", no_room)
    result = run("hyper", config, "-q", "--overwrite")
    assert result.code == 2 and len(result.err.splitlines()) == 1, result.err
    after = {p.relative_to(average): p.read_bytes() for p in average.rglob("*") if p.is_file()}
    assert after == before
    assert not [n for n in folder_listing(tmp_path / "out") if n.startswith(".")]


@pytest.mark.parametrize(
    "journal",
    [
        '{"new": [["a", Infinity, "f"]], "old": [], "old_marker": null}',
        '{"new": [["zz", 1, "f"]], "old": [], "old_marker": ["x\\u0000y", 1, "f"]}',
        '{"new": [["\\ud800", 1, "f"]], "old": [], "old_marker": null}',
        '{"new": [["a", 1]], "old": [], "old_marker": null}',
        '{"new": [], "old": [["notes.txt", INODE, "f"], ["keep", DIR, "d"]], "old_marker": null}',
        '{"new": [["zz", 1, "f"]], "old": [["notes.txt", INODE, "f"], ["keep", DIR, "d"]],'
        ' "old_marker": null}',
        "[" * 5000,
        "",
    ],
)
def test_a_journal_not_written_by_a_killed_run_never_stops_a_run_or_removes_a_folder(
    run, tmp_path, models, journal
):
    """Corrupt or hostile journals: the run goes on (exit 0), the journal goes, and neither a
    file it names nor a folder is touched unless it is a piece of a set (a folder never is,
    unless the killed run made it)."""
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "data.txt").write_text("mine")
    (tmp_path / "notes.txt").write_text("mine too")
    text = journal.replace("INODE", str((tmp_path / "notes.txt").stat().st_ino))
    text = text.replace("DIR", str((tmp_path / "keep").stat().st_ino))
    (tmp_path / ".x.weightmix-abcdefgh.commit").write_text(text)
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    assert (tmp_path / "keep" / "data.txt").read_text() == "mine"
    assert not (tmp_path / ".x.weightmix-abcdefgh.commit").exists()
    if '"new": []' in journal or "Infinity" in journal or "[" * 50 in journal:
        assert (tmp_path / "notes.txt").read_text() == "mine too"


def test_another_users_journal_is_not_followed(run, tmp_path, models):
    """In a shared folder another user could plant a journal naming our files: it is not
    followed (only the journal's owner's own runs write journals)."""
    (tmp_path / "notes.txt").write_text("mine")
    inode = (tmp_path / "notes.txt").stat().st_ino
    journal = tmp_path / ".x.weightmix-abcdefgh.commit"
    journal.write_text(json.dumps({"new": [["zz", 1, "f"]], "old": [["notes.txt", inode, "f"]],
                                   "old_marker": None}))  # fmt: skip
    os.chown(journal, 65534, 65534)
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "out.safetensors")
    assert result.code == 0, result.err
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_a_clean_up_that_fails_after_the_set_landed_is_not_an_error(run, tmp_path, models):
    """The new set is whole once moved: an old entry that cannot be removed (a folder named
    like a shard) stays, the run succeeds, and no later run removes that folder."""
    odd = tmp_path / "out-00001-of-00002.safetensors"
    odd.mkdir()
    (odd / "data.txt").write_text("mine")
    out = tmp_path / "out.safetensors"
    result = run("merge", models["A"], models["B"], "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert load(out)
    result = run("merge", models["A"], models["B"], "-o", tmp_path / "other.safetensors")
    assert result.code == 0 and "removed" not in result.err, result.err
    assert (odd / "data.txt").read_text() == "mine"
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".")]


def test_a_full_disk_that_counts_no_inodes_is_not_called_out_of_inodes(tmp_path):
    """tmpfs with nr_inodes=0 (like btrfs) reports 0 inodes, 0 free: a full disk there is
    said as a full disk."""
    from weightmix.io.writer import space_error

    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,nr_inodes=0", "tmpfs",
                           str(mount)], capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        fill(mount, 0)
        with pytest.raises(OSError) as caught, open(mount / "more", "wb") as handle:
            handle.write(b"\0" * 65536)
            handle.flush()
        message = str(space_error(mount / "out.safetensors", 8192, caught.value))
        assert "the disk is full" in message and "inode" not in message, message
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def merged_is_b(out: Path, models) -> bool:
    """Whether `out` holds (1 − 1)·A + 1·B: B's float tensors (others are A's)."""
    a, b = load(models["A"]), load(models["B"])
    return all(torch.equal(t, (b if t.is_floating_point() else a)[k]) for k, t in load(out).items())


def test_an_overwrite_exchanges_the_files_and_leaves_other_links_alone(run, tmp_path, models,
                                                                        monkeypatch):  # fmt: skip
    """--overwrite of a single-file output swaps the new file into place (one atomic exchange,
    no rename over a file: that makes ext4 write the new file out before returning) and then
    removes the old one; a hard link the user keeps to the old output still holds it."""
    from weightmix.io import locks

    out, kept = tmp_path / "out.safetensors", tmp_path / "kept.safetensors"
    assert run("merge", models["A"], models["B"], "--alpha", "0", "-o", out, "-q").code == 0
    os.link(out, kept)
    old_bytes = kept.read_bytes()
    exchanged = []
    real = locks._exchange

    def spy(first, second):
        exchanged.append(real(first, second))
        return exchanged[-1]

    monkeypatch.setattr(locks, "_exchange", spy)
    result = run("merge", models["A"], models["B"], "--alpha", "1", "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert exchanged == [True]
    assert merged_is_b(out, models)
    assert kept.read_bytes() == old_bytes and os.stat(kept).st_nlink == 1
    assert sorted(folder_listing(tmp_path)) == sorted(["A.safetensors", "B.safetensors",
                                                       "C.safetensors", "kept.safetensors",
                                                       "out.safetensors"])  # fmt: skip


def test_an_overwrite_without_exchange_falls_back_to_a_rename(run, tmp_path, models, monkeypatch):
    """Where renameat2 cannot exchange (old kernel, other libc, file system), os.replace."""
    from weightmix.io import locks

    out = tmp_path / "out.safetensors"
    assert run("merge", models["A"], models["B"], "--alpha", "0", "-o", out, "-q").code == 0
    monkeypatch.setattr(locks, "_exchange", lambda first, second: False)
    result = run("merge", models["A"], models["B"], "--alpha", "1", "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert merged_is_b(out, models)
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".")]


KILLED_AFTER_THE_EXCHANGE = """
import os, signal, sys
from weightmix import api
from weightmix.io import locks
real = locks.Path.unlink
def unlink(self, missing_ok=False):
    if self.name.endswith(".partial"):  # exchanged: the old file, under the temporary name
        os.kill(os.getpid(), signal.SIGKILL)
    real(self, missing_ok=missing_ok)
locks.Path.unlink = unlink
recipe = {"models": {"a": sys.argv[1], "b": sys.argv[2]},
          "merge": {"method": "weighted_sum", "inputs": ["a", "b"], "alpha": 1.0}}
api.merge(recipe, sys.argv[3], overwrite=True)
"""


def test_a_kill_after_the_exchange_leaves_the_new_output_and_a_swept_old_one(run, tmp_path, models):
    """Killed between the exchange and removing the old file: the output path holds the new
    output, whole; the old file under its temporary name is swept by the next run."""
    out = tmp_path / "out.safetensors"
    assert run("merge", models["A"], models["B"], "--alpha", "0", "-o", out, "-q").code == 0
    killed = python(KILLED_AFTER_THE_EXCHANGE, models["A"], models["B"], out)
    killed.wait()
    assert killed.returncode == -9
    assert merged_is_b(out, models)
    left = [n for n in folder_listing(tmp_path) if n.startswith(".")]
    assert sum(n.endswith(".partial") for n in left) == 1, left
    swept = sweep_stale(tmp_path)
    assert any(".partial" in w for w in swept), swept
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".")]
    assert merged_is_b(out, models)


@pytest.mark.parametrize("case", ["detached", "no-shell", "pid-1"])
def test_a_big_replaced_output_is_removed_in_the_background(run, tmp_path, models, monkeypatch,
                                                            case):  # fmt: skip
    """--overwrite of a big output: the old file is removed by a detached `rm` (the system's,
    whatever the user's PATH) holding its flock (a sweep meanwhile leaves it alone); here,
    where no shell starts or where this process is PID 1 (an orphan would never be reaped).
    Either way the new output is in place and, once the removal is done, no file is left."""
    import shutil

    from weightmix.io import locks

    out = tmp_path / "out.safetensors"
    assert run("merge", models["A"], models["B"], "--alpha", "0", "-o", out, "-q").code == 0
    old_inode = out.stat().st_ino
    monkeypatch.setattr(locks, "DETACHED_REMOVAL_BYTES", 0)  # the test's files count as big
    sleep = shutil.which("sleep")
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # no rm (nor anything) on it
    if case == "pid-1":
        monkeypatch.setattr(os, "getpid", lambda: 1)
    started = []
    real_run = subprocess.run

    def spawn(args, **options):
        if case == "no-shell":
            raise FileNotFoundError(args[0])
        started.append(args)  # the same command, its rm a moment later: still running below
        slow = [*args[:2], args[2].replace('"$1"', f'{sleep} 0.5 && "$1"'), *args[3:]]
        return real_run(slow, **options)

    monkeypatch.setattr(subprocess, "run", spawn)
    result = run("merge", models["A"], models["B"], "--alpha", "1", "-o", out, "--overwrite", "-q")
    assert result.code == 0, result.err
    assert merged_is_b(out, models) and out.stat().st_ino != old_inode
    assert len(started) == (1 if case == "detached" else 0)
    if started:  # the rm has the old file's lock: another run's sweep leaves it alone
        assert sweep_stale(tmp_path) == []
        assert len([n for n in folder_listing(tmp_path) if n.endswith(".partial")]) == 1
    for _ in range(500):  # the detached rm: gone within seconds
        if not [n for n in folder_listing(tmp_path) if n.startswith(".")]:
            break
        time.sleep(0.01)
    assert not [n for n in folder_listing(tmp_path) if n.startswith(".")]


def test_removing_an_old_output_that_became_a_fifo_does_not_block(tmp_path):
    from weightmix.io import locks

    fifo = tmp_path / ".out.safetensors.weightmix-abcdefgh.partial"
    os.mkfifo(fifo)
    locks.remove_old_output(fifo)  # opened without blocking, removed as not a file
    assert not os.path.lexists(fifo)


def test_an_output_that_becomes_a_folder_during_the_exchange_is_put_back(tmp_path, monkeypatch):
    """The destination is a file when checked and a user's folder by the time of the
    exchange: the folder goes back to its name (under the temporary name a sweep would
    remove it), the new file stays at its temporary name, and the move is refused."""
    from weightmix.io import locks

    dest, temp = (
        tmp_path / "out.safetensors",
        tmp_path / ".out.safetensors.weightmix-abcdefgh.partial",
    )
    dest.write_bytes(b"old")
    temp.write_bytes(b"new")
    real = locks._exchange

    def swap_in_a_folder(first, second):
        if second.read_bytes() == b"old":  # the first call only: the folder comes in now
            second.unlink()
            second.mkdir()
            (second / "keep.txt").write_text("mine")
        return real(first, second)

    monkeypatch.setattr(locks, "_exchange", swap_in_a_folder)
    with pytest.raises(WeightmixError, match="became a folder or a link"):
        locks.move_into_place(temp, dest)
    assert (dest / "keep.txt").read_text() == "mine"
    assert temp.read_bytes() == b"new"
