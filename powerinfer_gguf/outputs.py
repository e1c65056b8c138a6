"""What a command writes: checked before any slow work, written beside its target under a unique
temporary name, moved into place only when every output is complete.

The rules (issue 14): no command deletes or overwrites anything it was not asked to write (an
existing output needs ``force``; an output is never one of the inputs); outputs appear whole or
not at all, whatever the signal. A folder output (pi-synth --hf) is replaced, with ``force``, only
when it holds nothing but what that command writes there (our previous output): anything else in
it refuses the command, since replacing the folder would lose it.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Iterable, Iterator


class OutputError(ValueError):
    """An output path that cannot be written as asked; the message says why in one line."""


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def _writable_folder(path: Path, make_parents: bool) -> None:
    """The folder that will hold ``path`` exists (or, with make_parents, can be made) and takes new files."""
    parent = path.parent
    if not make_parents and not parent.exists():
        raise OutputError(f"{path}: folder {parent} does not exist")
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: {parent} is not a folder")
    try:  # a real probe: permissions, ACLs and read-only mounts all answer here
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as e:
        raise OutputError(f"{path}: folder {parent} is not writable ({e.strerror})") from None


def check_outputs(files: Iterable[Path | None], inputs: Iterable[Path], *,
                  folders: dict[Path, re.Pattern] | None = None, force: bool = False,
                  make_parents: bool = False) -> None:
    """Refuse, in one line, any output that would lose data or fail late. ``folders`` maps a folder
    output to the pattern of the names that command writes into it."""
    files = [Path(f) for f in files if f is not None]
    folders = {Path(k): v for k, v in (folders or {}).items()}
    inputs = [Path(i) for i in inputs]
    outs = files + list(folders)
    for i, out in enumerate(outs):
        for other in outs[:i]:
            if _same(out, other):
                raise OutputError(f"{out} is named as two outputs: give each its own path")
        for inp in inputs:
            if _same(out, inp):
                raise OutputError(f"{out} is an input of this command: write the output elsewhere")
        _writable_folder(out, make_parents)
    for f in files:
        if f.is_dir():
            raise OutputError(f"{f} is a folder: give a file name")
        for d in folders:
            if d.resolve() in f.resolve().parents:
                raise OutputError(f"{f} lies inside the output folder {d}, which is written whole: write it elsewhere")
        if f.exists() and not force:
            raise OutputError(f"{f} exists: pass --force to replace it")
    for d, ours in folders.items():
        _check_folder_output(d, ours, force)


def _check_folder_output(d: Path, ours: re.Pattern, force: bool) -> None:
    if not d.exists():
        return
    if not d.is_dir():
        raise OutputError(f"{d} exists and is not a folder")
    if not force:
        raise OutputError(f"{d} exists: pass --force to replace it")
    foreign = sorted(p.name for p in d.iterdir() if not (p.is_file() and ours.fullmatch(p.name)))
    if foreign:
        raise OutputError(f"{d} holds {foreign[0]!r}, which this command did not write: not replacing the "
                          "folder (move it away or choose another)")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block is done: a temporary is never made without being
    recorded, nor a set of renames or a cleanup cut in half. A signal that came meanwhile is
    raised again right after, to the handler that was there. (Handlers, not a signal mask: the
    process's other threads, BLAS's and tqdm's, would take a masked signal in its place.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: pending.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)  # None: set outside Python
        if pending:
            signal.raise_signal(pending[0])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class Staged:
    """Temporary siblings of the outputs; ``commit`` moves them into place, ``discard`` removes them.
    Temporary names come from tempfile (hidden, unique), so they never meet a user's file."""

    def __init__(self):
        self._files: list[tuple[Path, Path]] = []
        self._folders: list[tuple[Path, Path]] = []

    def file(self, target: Path) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            self._files.append((Path(tmp), target))
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 is not what a plain write would give
        return Path(tmp)

    def folder(self, target: Path) -> Path:
        target = Path(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        with _signals_held():
            tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent))
            self._folders.append((tmp, target))
        return tmp

    def temp(self, like: Path) -> Path:
        """A scratch file beside ``like`` that is never committed (removed with the others)."""
        with _signals_held():
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(like).name}.", suffix=".tmp", dir=Path(like).parent)
            self._files.append((Path(tmp), None))
        os.close(fd)
        return Path(tmp)

    def commit(self) -> None:
        with _signals_held():
            self._commit()

    def _commit(self) -> None:
        for tmp, target in self._files:
            if target is not None:
                os.replace(tmp, target)
            else:
                tmp.unlink(missing_ok=True)
        for tmp, target in self._folders:
            _replace_folder(tmp, target)
        self._files, self._folders = [], []

    def discard(self) -> None:
        with _signals_held():
            for tmp, _ in self._files:
                tmp.unlink(missing_ok=True)
            for tmp, _ in self._folders:
                shutil.rmtree(tmp, ignore_errors=True)
            self._files, self._folders = [], []


def _replace_folder(tmp: Path, target: Path) -> None:
    """Swap a finished folder in: the old one (checked to be our previous output) is renamed to a
    unique name first and removed only after the new one is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old)  # onto an empty folder: allowed by rename(2)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged() -> Iterator[Staged]:
    """Stage outputs; on any exception (KeyboardInterrupt included) only the temporaries go."""
    s = Staged()
    try:
        yield s
    except BaseException:
        s.discard()
        raise


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt while the block runs (as SIGINT does), so cleanup code
    runs and no temporary file is left; the previous handler is restored after."""
    try:
        previous = signal.signal(signal.SIGTERM, _interrupt)
    except ValueError:  # not the main thread: signals cannot be handled here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
