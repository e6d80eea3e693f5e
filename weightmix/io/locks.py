"""Temporary files that a killed run cannot leave behind for long, and one writer per output.

Every file or folder a run writes is first created under a hidden temporary name beside its
destination (`.NAME.weightmix-XXXXXXXX.partial`, `.NAME.weightmix-XXXXXXXX.old`,
`.weightmix-hyper-XXXXXXXX`) and
held under an exclusive flock(2) for as long as the run lives. The kernel drops that lock when
the process dies, even by `kill -9`, so a temporary entry nobody holds is known to be left over
from a run that ended without cleaning up: the next run writing to the folder removes it
(sweep_stale). Creating an entry and sweeping take a short lock on the folder itself, so a
sweep never sees an entry between its creation and its lock.

A destination is written by one run at a time: DestinationLock holds `.NAME.weightmix-lock`
beside it from before the first temporary file to after the last rename, and a second run that
finds it held is refused with a message naming the run that holds it.

A set of files (shards and their index, Hyper-Merge's outputs) cannot be moved into place in
one step: replace_set first writes a locked journal, `.NAME.weightmix-XXXXXXXX.commit`, naming
the new files and the old set's files with their inode numbers. A journal nobody holds means
the run was killed while moving: the sweep finishes its clean-up when the new set is whole,
and otherwise removes the files of both sets that it can prove (by inode) are the pieces the
move left, so that neither a mixed set nor a headless half of one stays behind.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from weightmix.errors import WeightmixError
from weightmix.io.header import is_text
from weightmix.io.interrupts import uninterrupted

_RANDOM = r"[a-z0-9_]{8}"  # tempfile's names
MARK = ".weightmix-"  # in every temporary name: a user's own hidden files never match
TEMPORARY = re.compile(
    rf"\.(?P<name>.+)\.weightmix-{_RANDOM}\.(?P<kind>partial|old|commit)|\.weightmix-hyper-{_RANDOM}",
    re.DOTALL,
)
LOCK_SUFFIX = ".weightmix-lock"
GUARD_WAIT = 5.0  # seconds a folder's flock is waited for before going on unguarded


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive flock on fd without waiting: True when taken, False when another
    holder has it, None when this file system cannot tell (no flock support)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


@contextmanager
def folder_guard(folder: Path) -> Iterator[None]:
    """Hold the folder's own flock while temporary entries are created or swept, waiting at
    most GUARD_WAIT seconds (someone else may hold it, e.g. `flock DIR command`): the guard
    only narrows a race, so past the wait the work goes on unguarded. Never in a run's own
    temporary folder: the run holds that one's lock, and no sweep looks inside it."""
    if TEMPORARY.fullmatch(folder.name):
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield  # unreadable folder: the write that follows reports the problem
        return
    try:
        deadline = time.monotonic() + GUARD_WAIT
        while _try_lock(fd) is False and time.monotonic() < deadline:
            time.sleep(0.01)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class Held:
    """An open descriptor whose exclusive flock marks a temporary entry as in use."""

    def __init__(self, fd: int):
        self.fd: int | None = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def temporary_file(dest: Path) -> tuple[int, Path]:
    """A new hidden `.NAME.weightmix-XXXXXXXX.partial` file beside dest, open and locked."""
    with folder_guard(dest.parent):
        fd, name = tempfile.mkstemp(
            prefix=f".{dest.name}{MARK}", suffix=".partial", dir=dest.parent
        )
        _try_lock(fd)
    return fd, Path(name)


def temporary_folder(parent: Path, prefix: str, suffix: str = "") -> tuple[Path, Held]:
    """A new hidden folder in parent (prefix: `.NAME.weightmix-` or `.weightmix-hyper-`),
    locked while held."""
    with folder_guard(parent):
        path = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
        fd = os.open(path, os.O_RDONLY)
        _try_lock(fd)
    return path, Held(fd)


def sweep_stale(folder: Path) -> list[str]:
    """Remove the temporary entries in folder that no live run holds (left by a run that was
    killed), and lock files nobody holds; put back a model folder that a killed --overwrite
    had moved aside. Returns what was done, one phrase per entry. Entries whose state cannot
    be known (no flock support, not a plain file or folder, no permission) are left alone."""
    done: list[str] = []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return done
    candidates = [n for n in names if TEMPORARY.fullmatch(n) or _is_lock_name(n)]
    if not candidates:
        return done
    with folder_guard(folder):
        for name in candidates:
            with suppress(OSError, ValueError):  # a sweep never stops the run that sweeps
                what = _sweep_one(folder, name)
                if what:
                    done.append(what)
    return done


def _sweep_one(folder: Path, name: str) -> str | None:
    path = folder / name
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) or _try_lock(fd) is not True:
            return None  # a live run holds it, or it cannot be known
        if _is_lock_name(name):
            if stat.S_ISREG(mode) and _same_file(fd, path):
                path.unlink()
                return name
            return None
        match = TEMPORARY.fullmatch(name)
        if match and match["kind"] == "commit" and stat.S_ISREG(mode):
            removed = _finish_set(folder, fd)
            path.unlink()
            if removed:
                return f"{name} (and {', '.join(removed)}, left by a killed move into place)"
            return name
        if match and match["kind"] == "old" and stat.S_ISDIR(mode):
            previous, dest = path / "previous", folder / match["name"]
            if previous.is_dir() and not dest.exists():  # killed between the two renames
                os.replace(previous, dest)
                shutil.rmtree(path, ignore_errors=True)
                return f"{name} (put back as {dest.name})"
        if stat.S_ISDIR(mode):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
        return name
    finally:
        os.close(fd)


def _is_lock_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(LOCK_SUFFIX)


def _same_file(fd: int, path: Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def lock_path(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}{LOCK_SUFFIX}")


class DestinationLock:
    """One writer per destination: an exclusive flock on `.NAME.weightmix-lock` beside it,
    taken without waiting (a second run is refused, naming the holder) and released, with the
    lock file removed, when the write is done or abandoned."""

    def __init__(self, dest: Path):
        self.dest = dest
        self.path = lock_path(dest)
        self.fd: int | None = None
        for _ in range(100):  # the lock file may be removed by its holder between open and lock
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as error:
                raise WeightmixError(
                    f"output {dest}: cannot create the lock file {self.path}"
                    f" ({error.strerror}): the folder must be writable and have room"
                ) from None
            if _try_lock(fd) is False:  # None: no flock here, so no lock to honour
                holder = _holder(fd)
                os.close(fd)
                raise WeightmixError(
                    f"output {dest} is being written by another weightmix run{holder}: wait"
                    f" for it to finish or choose another output (lock file {self.path})"
                )
            if _same_file(fd, self.path):
                # nothing is written into it: a lock file with a data block, removed at the end,
                # made the run wait for the disk to discard that block behind the output's
                # writes (1 s after an SDXL merge with the `discard` mount option); who holds
                # it is found in /proc/locks instead
                self.fd = fd
                return
            os.close(fd)  # we locked a file its holder had just removed: try again
        raise WeightmixError(f"output {dest}: could not take the lock {self.path}; try again")

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> DestinationLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _holder(fd: int) -> str:
    """' (process N)' for the process holding a flock on fd's file, as /proc/locks lists it
    (lines such as `1: FLOCK  ADVISORY  WRITE 1234 fd:00:5678 0 EOF`); '' where it cannot be
    told. The inode must match, and the device too where one entry does."""
    try:
        info = os.fstat(fd)
        with open("/proc/locks", encoding="ascii", errors="replace") as table:
            rows = [line.split() for line in table]
    except OSError:
        return ""
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
    found = [(row[4], row[5]) for row in rows if len(row) >= 6 and row[1] == "FLOCK"
             and row[5].rsplit(":", 1)[-1] == str(info.st_ino) and row[4].isdigit()]  # fmt: skip
    exact = [pid for pid, where in found if where == f"{device}:{info.st_ino}"]
    pids = exact or {pid for pid, _ in found}
    return f" (process {next(iter(pids))})" if len(set(pids)) == 1 else ""


def replace_set(moves: list[tuple[Path, Path]], old: list[Path], first: Path | None) -> None:
    """Move each temporary file (or folder) to its destination, in order (the last is the
    set's marker, e.g. the shard index), under a journal a sweep can finish from; then remove
    the files of `old` (what the destinations replace, in any layout) that the new set did not
    overwrite. `first`, when given, is removed before anything moves (an old index: the old set
    stops being a set before any of its files is replaced). A destination that is a folder
    must not exist (move an old one aside first)."""
    with uninterrupted():  # a Ctrl-C waits: no journal or old file is left by one
        folder = moves[-1][1].parent
        with folder_guard(folder):
            fd, name = tempfile.mkstemp(
                prefix=f".{moves[-1][1].name}{MARK}", suffix=".commit", dir=folder
            )
            _try_lock(fd)
        journal = Path(name)
        try:
            marker = next((p for p in (first, *old) if p is not None and p.exists()), None)
            record = {
                "new": [_entry(dest.name, temp) for temp, dest in moves],
                "old": [_entry(p.name, p) for p in old if _inode(p) is not None],
                "old_marker": _entry(marker.name, marker) if marker is not None else None,
            }
            try:
                _write_all(fd, json.dumps(record).encode())
            except OSError:
                journal.unlink(missing_ok=True)  # nothing moved yet: no journal is needed
                raise
            if first is not None:
                first.unlink(missing_ok=True)
            for temp, dest in moves:
                move_into_place(temp, dest)
        except BaseException:
            os.close(fd)  # the journal stays, unheld: the next sweep finishes or undoes the move
            raise
        placed = {dest for _, dest in moves}
        for path in old:  # the new set is whole: the rest is clean-up, best effort
            if path not in placed:
                with suppress(OSError):
                    path.unlink()
        journal.unlink(missing_ok=True)
        os.close(fd)


def move_into_place(temp: Path, dest: Path) -> None:
    """os.replace(temp, dest); over an existing regular file, by exchanging the two names
    (renameat2 RENAME_EXCHANGE, as atomic: dest always holds a whole file) and removing the
    old file from the temporary name. ext4 (auto_da_alloc) writes a file renamed over another
    out to disk before the rename returns: 2.3 s for a 2.1 GB output on the development
    machine, against none for an exchange or a rename to a new name (bench/RESULTS.md). So an
    --overwrite costs what a new output costs; durability against power loss is --fsync's job
    in both cases."""
    if _regular_file(temp) and _regular_file(dest) and _exchange(temp, dest):
        if not _regular_file(temp) and os.path.lexists(temp):  # dest changed meanwhile:
            _exchange(temp, dest)  # put it back (a sweep would take it under that name)
            raise WeightmixError(
                f"output {dest} became a folder or a link while the merge was moved into"
                " place; nothing was replaced: remove it or choose another output"
            )
        remove_old_output(temp)  # the old file now; a sweep may have taken it already
        return
    os.replace(temp, dest)


DETACHED_REMOVAL_BYTES = 256 * 2**20  # an old output this big is removed in the background


def remove_old_output(path: Path) -> None:
    """Remove an old output that a new one replaced (under its temporary name). Freeing a big
    file's blocks takes time: unlinking 2.1 GB took 0.42-0.49 s here (ext4 mounted with
    `discard`). So a file of DETACHED_REMOVAL_BYTES or more is removed by a detached `rm`
    that the command does not wait for; it keeps the file's flock until it is done, so a
    sweep by another run meanwhile leaves it alone. Where no `rm` can start, it is removed
    here."""
    try:  # not blocking on a FIFO swapped in meanwhile
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:  # gone (a sweep took it) or not a file to open: as before, unlink
        path.unlink(missing_ok=True)
        return
    try:
        info = os.fstat(fd)
        big = stat.S_ISREG(info.st_mode) and info.st_size >= DETACHED_REMOVAL_BYTES
        if not big or not _remove_detached(path, fd):
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def _remove_detached(path: Path, fd: int) -> bool:
    """Start the system's `rm` (from the default path, not the user's PATH) on path in the
    background, in a session of its own (a hang-up of the terminal does not stop it), holding
    fd's flock until it ends; whether it started. Not where this process is PID 1 (a
    container's entry point): the orphaned `rm` would be its child, never reaped."""
    import shutil
    import subprocess

    remover = shutil.which("rm", path=os.defpath)
    if remover is None or os.getpid() == 1:
        return False
    _try_lock(fd)
    try:
        shell = subprocess.run(
            ["/bin/sh", "-c", '"$1" -f -- "$2" &', "sh", remover, str(path.absolute())],
            pass_fds=(fd,),  # rm inherits the descriptor, so the lock
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return shell.returncode == 0


def _regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path, follow_symlinks=False).st_mode)
    except (OSError, ValueError):
        return False


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100
_renameat2: list = []  # the C function once looked up, or None where libc has none


def _exchange(first: Path, second: Path) -> bool:
    """Swap two names atomically; False where the system or file system cannot (then nothing
    moved)."""
    if not _renameat2:
        try:
            function = ctypes.CDLL(None, use_errno=True).renameat2
            function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                                 ctypes.c_uint]  # fmt: skip
            function.restype = ctypes.c_int
        except (AttributeError, OSError):  # no glibc 2.28+ here
            function = None
        _renameat2.append(function)
    function = _renameat2[0]
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE):
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
            return False  # an old kernel, or a file system without exchange
        raise OSError(code, os.strerror(code), str(first), None, str(second))
    return True


def _entry(name: str, path: Path) -> list:
    """[name, inode, 'd' for a folder or 'f']: what a sweep may remove, and how."""
    info = os.stat(path, follow_symlinks=False)
    return [name, info.st_ino, "d" if stat.S_ISDIR(info.st_mode) else "f"]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path, follow_symlinks=False).st_ino
    except (OSError, ValueError):  # ValueError: a NUL or a lone surrogate in the name
        return None


def _entries(value: object) -> list[tuple[str, int, str]]:
    """A journal's list of [name, inode, kind], checked: plain names in the folder only."""
    if not isinstance(value, list):
        raise ValueError("not a list")
    found = []
    for item in value:
        name, inode, kind = item
        if not (isinstance(name, str) and type(inode) is int and kind in ("d", "f")):
            raise ValueError("not [name, inode, kind]")
        if "/" in name or "\0" in name or name in ("", ".", "..") or not is_text(name):
            raise ValueError("not a plain name")
        found.append((name, inode, kind))
    return found


def _finish_set(folder: Path, fd: int) -> list[str]:
    """What a journal left by a killed replace_set asks: returns the names removed. Only a
    journal this user owns is followed (another user's could name our files), and only
    entries whose inode and kind still match are removed."""
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return []
        record = json.loads(os.pread(fd, 1 << 20, 0))
        new = _entries(record["new"])
        old = _entries(record["old"])
        marker = _entries([record["old_marker"]]) if record["old_marker"] is not None else []
    except (ValueError, TypeError, KeyError, IndexError, RecursionError, OverflowError):
        return []  # not a journal this code wrote: only the journal goes
    if not new:
        return []

    def present(name: str, inode: int, kind: str) -> bool:
        try:
            info = os.stat(folder / name, follow_symlinks=False)
        except (OSError, ValueError):
            return False
        is_dir = stat.S_ISDIR(info.st_mode)
        return info.st_ino == inode and (is_dir if kind == "d" else stat.S_ISREG(info.st_mode))

    if all(present(*entry) for entry in new):
        doomed = old  # the new set landed: the old files it did not overwrite go
    elif marker and present(*marker[0]):
        doomed = new  # it did not, and the old set is whole: only the new pieces go
    else:
        doomed = new + old  # neither set is whole: the pieces of both go
    removed = []
    folders = {(name, inode) for name, inode, kind in new if kind == "d"}
    for name, inode, kind in doomed:
        if kind == "d" and (name, inode) not in folders:
            continue  # only a folder this run made is removed whole
        if present(name, inode, kind):
            if kind == "d":
                shutil.rmtree(folder / name)  # a model folder of the set (Hyper's average)
            else:
                (folder / name).unlink()
            removed.append(name)
    return removed
