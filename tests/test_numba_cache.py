"""Where numba caches fmoe's compiled kernels when it has nowhere of its own (a read-only
install run with a read-only HOME)."""

from __future__ import annotations

import os
import stat

import numba
import pytest

import fmoe.files as files


@pytest.fixture
def nowhere(monkeypatch, tmp_path):
    """The package's __pycache__ and the user's cache cannot be written; numba has no cache dir
    set; the temporary directory is `tmp_path`."""
    real = files._writable_dir
    pkg = os.path.join(os.path.dirname(os.path.abspath(files.__file__)), "__pycache__")
    from numba.misc.appdirs import AppDirs

    user = AppDirs(appname="numba", appauthor=False).user_cache_dir
    monkeypatch.setattr(files, "_writable_dir", lambda p: p not in (pkg, user) and real(p))
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.delenv("FMOE_CACHE", raising=False)
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    return tmp_path


def test_left_alone_when_numba_can_cache(monkeypatch):
    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.setattr(files, "_writable_dir", lambda p: True)
    files.numba_cache(files.__file__)
    assert numba.config.CACHE_DIR == ""
    monkeypatch.setattr(numba.config, "CACHE_DIR", "/chosen/by/user")
    files.numba_cache(files.__file__)
    assert numba.config.CACHE_DIR == "/chosen/by/user"


def test_fmoe_cache_then_a_private_temporary_dir(nowhere, monkeypatch):
    monkeypatch.setenv("FMOE_CACHE", str(nowhere / "fmoe"))
    files.numba_cache(files.__file__)
    assert numba.config.CACHE_DIR == str(nowhere / "fmoe" / "numba")

    monkeypatch.setattr(numba.config, "CACHE_DIR", "")
    monkeypatch.delenv("FMOE_CACHE")
    files.numba_cache(files.__file__)
    mine = nowhere / f"fmoe-numba-{os.getuid()}"
    assert numba.config.CACHE_DIR == str(mine)
    assert stat.S_IMODE(mine.stat().st_mode) & 0o077 == 0


def test_a_dir_others_can_write_is_not_used(nowhere, monkeypatch):
    """Numba loads compiled code from its cache: a shared directory others could fill is refused
    for a fresh private one."""
    shared = nowhere / f"fmoe-numba-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)
    files.numba_cache(files.__file__)
    chosen = numba.config.CACHE_DIR
    assert chosen != str(shared) and os.path.dirname(chosen) == str(nowhere)
    assert stat.S_IMODE(os.stat(chosen).st_mode) == 0o700


def test_kernels_compile_and_cache_there(nowhere, tmp_path):
    """A cached kernel made after the choice is written to the chosen directory."""
    files.numba_cache(files.__file__)
    src = tmp_path / "kern_mod.py"
    src.write_text("import numba\n\n@numba.njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    import importlib.util

    spec = importlib.util.spec_from_file_location("kern_mod", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.twice(21) == 42
    assert any(name.endswith(".nbi") for _, _, names in os.walk(numba.config.CACHE_DIR) for name in names)


def test_nowhere_at_all_compiles_without_a_cache(nowhere, monkeypatch):
    """A fully read-only machine (no temporary directory either): the kernels are compiled in
    each process instead of the import failing."""
    monkeypatch.setattr(files, "_private_dir", lambda p: False)

    def no_tmp(*a, **k):
        raise OSError("read-only file system")
    monkeypatch.setattr("tempfile.mkdtemp", no_tmp)
    assert files.numba_cache(files.__file__) is False
    assert numba.config.CACHE_DIR == ""
