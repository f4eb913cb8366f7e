"""The error boundary of every entry point: a failure the user can cause ends as one line on stderr, a bug keeps its
traceback. The first lines of train.py, sample.py, attention.py, bench.py and data/*/prepare.py:

    import errors
    errors.install(__name__)  # before torch and numpy load: a Ctrl-C during those imports is one line too

A user's failures are SystemExit (Python prints its one line), ValueError (this project's type for a bad file or
value), OSError (a missing or unwritable path, a full disk), running out of memory (exit status 1), and Ctrl-C (exit
status 130). Anything else (TypeError, KeyError, AssertionError, other RuntimeErrors...) is a bug: its traceback is
printed. SMALLGPT_DEBUG=1 prints the traceback of everything, a SystemExit's too. This module imports only the
standard library.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from types import ModuleType, TracebackType
from typing import NoReturn

_HINTS = {  # errno -> what it means for the user, where strerror alone does not say what to do
    errno.ENOSPC: "no space left on the device: free some space or write elsewhere, then run again",
    errno.EDQUOT: "disk quota exceeded: free some space or write elsewhere, then run again",
    errno.EFBIG: "file too large for this file system or this process's file-size limit (ulimit -f)",
    errno.EACCES: "permission denied: choose a path you may write to, or change its permissions",
    errno.EROFS: "read-only file system: write elsewhere",
    errno.EISDIR: "is a folder, where a file was expected",
    errno.ENOTDIR: "a part of this path is a file, where a folder was expected",
    errno.ENOENT: "no such file or folder",
    errno.EEXIST: "already exists, as something other than what was expected (a file instead of a folder?)",
    errno.ELOOP: "a loop of symbolic links",
}


def message(e: BaseException) -> str | None:
    """The one line to print for an exception a user can cause; None for a bug, whose traceback should show."""
    if isinstance(e, KeyboardInterrupt):
        text = str(e) or "interrupted"
    elif isinstance(e, OSError):
        where = " -> ".join(str(f) for f in (e.filename, e.filename2) if f is not None)
        what = _HINTS.get(e.errno) or e.strerror or str(e)
        text = f"{where}: {what}" if where else what
    elif isinstance(e, MemoryError) or isinstance(e, RuntimeError) and (
            type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e)):  # torch's CPU allocator
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        text = f"out of memory ({first}): use a smaller model, batch or context, or a machine with more memory"
    elif isinstance(e, ValueError):
        text = str(e) or type(e).__name__
    else:
        return None
    return " ".join(line.strip() for line in text.splitlines() if line.strip())  # one line, whatever the source


def report(e: BaseException) -> int | None:
    """Print message(e) to stderr and return the exit status (130 for Ctrl-C, else 1); None, printing nothing, for a
    bug."""
    text = message(e)
    if text is None:
        return None
    print(text, file=sys.stderr)
    return 130 if isinstance(e, KeyboardInterrupt) else 1


def _hook(kind: type[BaseException], e: BaseException, tb: TracebackType | None) -> None:
    status = report(e)
    if status is None:
        sys.__excepthook__(kind, e, tb)  # a bug: the traceback, exit status 1
    elif status != 1:  # the interpreter exits with 1 after a hook; Ctrl-C's 130 needs an explicit exit
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(status)


_debugging = False  # the script is being run again under _debug_run


def install(name: str) -> None:
    """Make this module the boundary of the script being run: call it with the script's __name__ (a module imported
    by another one, or by the tests, leaves sys.excepthook alone)."""
    if name != "__main__" or _debugging:
        return
    if os.environ.get("SMALLGPT_DEBUG", "") in ("", "0"):
        sys.excepthook = _hook
    elif getattr(sys.modules["__main__"], "__file__", None):
        _debug_run(sys.modules["__main__"])


def _debug_run(main: ModuleType) -> NoReturn:
    """SMALLGPT_DEBUG=1: run the script's module again from here, in its own namespace, so that a SystemExit with a
    message, which Python prints without a traceback, shows where it was raised and what it replaced."""
    global _debugging
    _debugging = True
    with open(main.__file__, "rb") as f:
        code = compile(f.read(), main.__file__, "exec", dont_inherit=True)
    try:
        exec(code, main.__dict__)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        e.__suppress_context__ = False  # `raise SystemExit(...) from None` hid the error it stands for
        traceback.print_exception(e)
        sys.exit(1)
    sys.exit(0)  # the module ran to its end; the first run must not go on past install()


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Name `path` in an OSError raised inside (a write to a full disk says no file name of its own)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            e.filename = os.fspath(path)
        raise


def fsync(path: str | os.PathLike) -> None:
    """Flush a file's or a folder's contents to the disk (a folder's: its list of entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def not_a_file(path: str | os.PathLike) -> str | None:
    """Why `path` is not a regular file one can read, in words to follow "path: "; None when it is one. Asks without
    opening: opening a FIFO would wait for a writer."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        if os.path.islink(path):
            return f"a symbolic link to {os.readlink(path)}, which does not exist"
        return "no such file or folder"
    except OSError as e:
        return _HINTS.get(e.errno) or e.strerror or str(e)  # ELOOP: a loop of symbolic links
    if stat.S_ISDIR(mode):
        return "a folder, where a file belongs"
    if not stat.S_ISREG(mode):
        kind = "a pipe (FIFO)" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "a special file"
        return f"{kind}, not a regular file: save the data into a file and pass that"
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process exists (to tell a dead run's temporary files from a live one's)."""
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def lock(path: Path, refusal: str) -> tuple[int, Path]:
    """Hold an exclusive lock on the file `path` (made if missing) for this process, with its pid written inside;
    SystemExit(refusal with {pid} filled in) when another process holds it. The kernel releases it when the process
    ends, kill -9 included; unlock releases it and removes the file. On a file system without locks (some network
    mounts) it warns and goes on unlocked. A symbolic link, or a file that holds anything but a pid, is refused and
    left as it is: the lock never writes into a file that is not its own."""
    while True:
        try:
            fd, made = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), True
        except FileExistsError:
            try:  # a killed holder's file, or someone else's: read before writing, never truncate on open
                fd, made = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK), False
            except FileNotFoundError:
                continue  # its holder removed it meanwhile
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise SystemExit(f"{path} is a symbolic link, where this lock file belongs: remove the link (its "
                                     f"target is left alone) and run again") from None
                if e.errno == errno.EISDIR:
                    raise SystemExit(f"{path} is a folder, where this lock file belongs: move it away and run "
                                     f"again") from None
                raise
        try:
            if not made and not _own_lock_file(fd):
                raise SystemExit(f"{path} is not a lock file (it holds something other than a process id): move it "
                                 f"away and run again; it was left as it is")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise SystemExit(refusal.format(pid=holder)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                os.close(fd)
                raise
            print(f"warning: {path.parent} cannot be locked ({e.strerror}): nothing stops a second process from "
                  f"writing into it too", file=sys.stderr)
        except BaseException:
            os.close(fd)
            raise
        # A holder that ended between our open and our lock removed the file: then ours is a stale inode, try again.
        try:
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)  # a file made here or a dead holder's pid: ours to rewrite
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, path


def _own_lock_file(fd: int) -> bool:
    """Whether an open file is what lock() writes: a regular file holding nothing or one pid."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > 32:
        return False
    text = os.pread(fd, 32, 0)
    return text.strip().isdigit() or not text.strip()


def unlock(lock: tuple[int, Path]) -> None:
    """Release a lock(): the file is removed first, while still held, so no one can lock it meanwhile."""
    fd, path = lock
    with suppress(OSError):
        path.unlink()
    os.close(fd)
