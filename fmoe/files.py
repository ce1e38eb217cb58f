"""Written files: whole or not at all (`atomic_write`), with the mode a plain open() gives.

Atomic writes go through `tempfile.mkstemp` / `mkdtemp`, which create owner-only entries (0o600,
0o700) so that a partial result is private; `os.replace` / `os.rename` would carry that mode to
the final name. `plain_mode` gives the result the mode a plain ``open()`` or ``mkdir()`` would.
"""

from __future__ import annotations

import os


def umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere it is set and put
    back at once (the only portable read, but another thread creating a file in between would
    get 0o022: the server writes from several threads)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike) -> None:
    """Give `path` the mode ``open()`` (0o666) or ``mkdir()`` (0o777, a directory) gives under
    this process's umask. Call it on the temporary path before the rename, so that the final
    name never shows the owner-only mode."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~umask())


def atomic_write(path: str | os.PathLike, write, *, fsync: bool = False, prefix: str | None = None,
                 suffix: str = ".tmp") -> None:
    """Write a file whole or not at all: `write(f)` fills a temporary file (binary) in the same
    directory, which gets `plain_mode` and is renamed over `path`; on any error it is removed
    and the error raised. `fsync`: flushed to disk before the rename. `prefix`: the temporary
    name's (default ``.NAME.``)."""
    import tempfile

    path = os.fspath(path)
    folder, name = os.path.split(path)
    fd, tmp = tempfile.mkstemp(dir=folder or ".", prefix=f".{name}." if prefix is None else prefix,
                               suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        plain_mode(tmp)           # mkstemp's 0600 is for the partial file only
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def unwritable(path: str | os.PathLike, makes_dirs: bool = True) -> str | None:
    """Why `path` could not be written, or None when it can: it is a directory, or the nearest
    directory that exists (`makes_dirs`: the writer makes the missing ones below it; else its
    own directory must exist) is not a directory or takes no new entry. Tried by creating and
    removing one there: permission bits do not tell (root, a read-only mount, /proc)."""
    import tempfile
    from pathlib import Path

    p = Path(path)
    if p.is_dir():
        return "is a directory"
    d = p.parent
    if not makes_dirs and not os.path.lexists(d):
        return f"no directory {str(d)!r} to write it in"
    while not os.path.lexists(d) and d != d.parent:
        d = d.parent
    if not d.is_dir():
        return f"{str(d)!r} is not a directory"
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=d)
    except OSError as e:
        return f"cannot write in {str(d)!r} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


class FileLock:
    """An exclusive advisory lock (``flock``) on ``PATH.lock``, so that two processes never keep
    the same file, each writing over the other's at exit; held until `release` (or the process
    ends). `what` names the path in the error (ValueError) when another process holds it.
    Where ``fcntl`` does not exist the lock is a no-op."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.fd = None
        try:
            import fcntl
        except ImportError:       # pragma: no cover - not on Linux or macOS
            return
        lock = self.lock = f"{os.fspath(path)}.lock"
        os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)     # as the file's writer does
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ValueError(f"{what} {os.fspath(path)} is in use by another process (it "
                                 f"holds {lock}); give each process its own file") from None
            # the holder before us removes the file on release: a lock on the inode it
            # removed is no lock; take the one at the path now
            try:
                same = os.stat(lock).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        self.pid = os.getpid()

    def release(self) -> None:
        """Remove ``PATH.lock`` (still held, so no one else is between) and let it go. A forked
        child's copy only closes its descriptor: the lock stays its parent's."""
        if self.fd is not None:
            if os.getpid() == self.pid:
                try:
                    os.unlink(self.lock)
                except OSError:
                    pass
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()


def _writable_dir(path: str) -> bool:
    """Whether files can be made in `path` (created if missing), as numba checks a cache dir."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _private_dir(path: str) -> bool:
    """`path` exists or is made as a directory of this user's that nobody else can write."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    import stat

    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def numba_cache(module_file: str) -> bool:
    """Call before a module's compiled kernels are made; returns their ``cache=`` value. Numba
    caches them in the package's ``__pycache__``, else in the user's cache directory, and fails
    ("no locator available") when neither can be written: a root-owned install run by a user
    whose HOME is read-only (a service account, a read-only container). Then the cache goes to
    ``$FMOE_CACHE/numba`` when that can be written, else to a directory of this user's in the
    temporary directory; where nothing can be written, kernels are compiled in each process
    (False). A cache directory the user chose (``NUMBA_CACHE_DIR``) is left alone."""
    import numba
    from numba.misc.appdirs import AppDirs

    if numba.config.CACHE_DIR:
        return True
    here = os.path.join(os.path.dirname(os.path.abspath(module_file)), "__pycache__")
    user = AppDirs(appname="numba", appauthor=False).user_cache_dir
    if _writable_dir(here) or _writable_dir(user):
        return True
    import tempfile

    chosen = os.environ.get("FMOE_CACHE")
    chosen = os.path.join(chosen, "numba") if chosen else None
    if chosen is None or not _writable_dir(chosen):
        # compiled code is loaded from there: only a directory nobody else can write will do
        try:
            me = os.getuid() if hasattr(os, "getuid") else os.getlogin()
            chosen = os.path.join(tempfile.gettempdir(), f"fmoe-numba-{me}")
            if not _private_dir(chosen):
                chosen = tempfile.mkdtemp(prefix="fmoe-numba-")
        except OSError:
            return False
    numba.config.CACHE_DIR = chosen
    return True
