"""Crash-consistent, serialised writes of adapter directories, and reads that see one generation.

A *generation* is the set of files one save writes into a directory (for an adapter:
``adapter_config.json`` and ``adapter_model.safetensors``). Files keep their usual names, so
HF PEFT and transformers read our directories as they are. A save:

1. takes an exclusive lock on the directory (``flock`` on the directory itself, so no lock file
   is left behind); readers take a shared one, so they never see a save in progress;
2. finishes what an interrupted save had committed and removes what one had only staged;
3. writes the new files into a staging directory inside it (``.peft-stage-*``) and syncs them;
4. *commits* by renaming a journal (``.peft-commit.json``, naming the staged files and the
   files the generation drops) into place: one atomic rename;
5. moves the staged files over the old ones (the config files last, after removing the old
   ones first, so a reader that ignores the journal finds no config rather than a mix), then
   removes the journal.

Killed before step 4, the directory holds the old generation (plus staging debris); killed
after it, the journal names the new generation completely, and :func:`committed_path` (which
every reader of the kernel uses) finds each of its files, staged or moved. The next save
completes the move.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

STAGE_PREFIX = ".peft-stage-"
JOURNAL_NAME = ".peft-commit.json"
#: files moved last (and removed first): without them no reader takes a directory for a model
ANCHOR_NAMES = ("adapter_config.json", "config.json")
#: staging files of earlier versions (``.tmp-<random>-<name>``), removed by the next save
_LEGACY_TMP_PREFIX = ".tmp-"
_JOURNAL_FORMAT = 1

# directories this thread / task has locked, and how: locks are re-entrant within one call chain
_held: ContextVar[dict[str, bool] | None] = ContextVar("peft_kernel_held_locks", default=None)


class ConcurrentAccessError(RuntimeError):
    """A directory is being read and written by the same call chain."""


# -- locks ------------------------------------------------------------------------------


@contextmanager
def locked(directory: str, exclusive: bool = False) -> Iterator[None]:
    """Hold a shared (read) or exclusive (write) lock on ``directory`` for the ``with`` block.

    Writers create the directory. Re-entrant within one call chain; a missing directory (for
    readers) or a file system without ``flock`` means no lock, and the block runs all the same.
    """
    if exclusive:
        os.makedirs(directory, exist_ok=True)
    key = os.path.realpath(directory)
    held = _held.get() or {}
    if key in held:
        if exclusive and not held[key]:
            raise ConcurrentAccessError(f"cannot write {directory!r} while reading it in the same call")
        yield
        return
    fd = _lock_directory(key, exclusive)
    token = _held.set({**held, key: exclusive})
    try:
        yield
    finally:
        _held.reset(token)
        if fd is not None:
            os.close(fd)  # releases the lock


def _lock_directory(path: str, exclusive: bool) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX: no locking
        return None
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    except OSError:  # e.g. some network file systems
        os.close(fd)
        return None
    return fd


# -- writing ----------------------------------------------------------------------------


@contextmanager
def staged(directory: str, remove: Iterable[str] = (), replace_all: bool = False) -> Iterator[str]:
    """Yield an empty staging directory; on success its entries replace the same names in
    ``directory`` as one generation, and ``remove`` (or, with ``replace_all``, every other
    entry) disappears with them. On an error inside the block ``directory`` is unchanged."""
    with locked(directory, exclusive=True):
        recover(directory)
        stage = tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=directory)
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        _commit(directory, stage, remove, replace_all)


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` and move the result onto ``path`` only if it succeeded."""
    directory, name = os.path.split(os.path.abspath(path))
    with staged(directory) as stage:
        write(os.path.join(stage, name))


def atomic_write_text(path: str, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def _commit(directory: str, stage: str, remove: Iterable[str], replace_all: bool) -> None:
    names = sorted(os.listdir(stage))
    for name in names:
        _fsync(os.path.join(stage, name))
    _fsync(stage)
    if replace_all:
        remove = [e for e in os.listdir(directory) if not _is_ours(e)]
    journal = {
        "format": _JOURNAL_FORMAT,
        "stage": os.path.basename(stage),
        "files": names,
        "remove": sorted(r for r in set(remove) - set(names) if os.path.lexists(os.path.join(directory, r))),
    }
    pending = os.path.join(stage, JOURNAL_NAME)
    with open(pending, "w", encoding="utf-8") as fh:
        json.dump(journal, fh)
    _fsync(pending)
    os.replace(pending, os.path.join(directory, JOURNAL_NAME))  # the commit point
    _fsync(directory)
    _roll_forward(directory, journal)


def _roll_forward(directory: str, journal: dict) -> None:
    """Make the committed generation the directory's files and drop the journal (idempotent)."""
    stage = os.path.join(directory, journal["stage"])
    files = journal["files"]
    anchors = [n for n in files if n in ANCHOR_NAMES]
    for name in anchors:  # first: an old config next to half-moved new files would look complete
        if os.path.lexists(os.path.join(stage, name)) and os.path.lexists(os.path.join(directory, name)):
            _remove(os.path.join(directory, name))
    for name in journal["remove"]:
        _remove(os.path.join(directory, name))
    for name in [n for n in files if n not in anchors] + anchors:
        source, target = os.path.join(stage, name), os.path.join(directory, name)
        if os.path.lexists(source):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(source, target)
    # not synced: after a power loss the journal, if it is back, is rolled forward again
    os.unlink(os.path.join(directory, JOURNAL_NAME))
    _remove(stage)


def recover(directory: str) -> None:
    """Finish a committed save and remove staging leftovers (callers hold the write lock)."""
    journal = _read_journal(directory)
    if journal is not None:
        _roll_forward(directory, journal)
    for entry in os.listdir(directory):
        if is_staging_debris(entry):
            _remove(os.path.join(directory, entry))


def is_staging_debris(entry: str) -> bool:
    """Whether a directory entry is what an unfinished, uncommitted save left (removed by the next save)."""
    return entry.startswith(STAGE_PREFIX) or entry.startswith(_LEGACY_TMP_PREFIX) and entry.endswith(
        ("-adapter_model.safetensors", "-adapter_model.bin", "-adapter_config.json", "-README.md"))


def _is_ours(entry: str) -> bool:
    return entry.startswith(STAGE_PREFIX) or entry == JOURNAL_NAME


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)


def _fsync(path: str) -> None:
    """Flush a file or directory to disk (a no-op where directories cannot be opened, and
    with ``PEFT_KERNEL_FSYNC=0``: saves then survive killed processes, not power losses)."""
    if os.environ.get("PEFT_KERNEL_FSYNC") == "0":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ----------------------------------------------------------------------------


def committed_path(directory: str, name: str) -> str | None:
    """Where the current generation of ``directory`` keeps ``name``: its usual path, or its
    staged copy after a save was interrupted between commit and move; ``None`` when the
    committed generation removes it. Whether the file exists is the caller's question."""
    journal = _read_journal(directory)
    if journal is None:
        return os.path.join(directory, name)
    if name in journal["files"]:
        staged_copy = os.path.join(directory, journal["stage"], name)
        return staged_copy if os.path.lexists(staged_copy) else os.path.join(directory, name)
    if name in journal["remove"]:
        return None
    return os.path.join(directory, name)


def _read_journal(directory: str) -> dict | None:
    path = os.path.join(directory, JOURNAL_NAME)
    try:
        with open(path, encoding="utf-8") as fh:
            journal = json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path} is unreadable ({exc}); remove it and save the adapter again") from None
    if not _valid_journal(journal, directory):
        raise ValueError(f"{path} is not a peft-kernel save journal; remove it and save the adapter again")
    return journal


def _valid_journal(journal: object, directory: str) -> bool:
    """Every name is one path component, and the stage is a real directory inside ``directory``:
    a crafted journal must not make us read or move anything elsewhere."""
    if not isinstance(journal, dict) or journal.get("format") != _JOURNAL_FORMAT:
        return False
    stage, files, remove = journal.get("stage"), journal.get("files"), journal.get("remove")
    if not (isinstance(stage, str) and stage.startswith(STAGE_PREFIX) and isinstance(files, list)
            and isinstance(remove, list)):
        return False
    if not all(isinstance(n, str) and _single_component(n) for n in [stage, *files, *remove]):
        return False
    stage_path = os.path.join(directory, stage)
    return not os.path.islink(stage_path) and (os.path.isdir(stage_path) or not os.path.lexists(stage_path))


def _single_component(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(
        sep and sep in name for sep in (os.sep, os.altsep, "\0"))
