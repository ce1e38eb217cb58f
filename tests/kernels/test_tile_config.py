"""Config files for the Triton kernel: naming, lookup by shape and nearest T, logged defaults."""

import json
import logging

import pytest
import torch

from fmoe.kernels import tile_config


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    """An empty config directory searched before the packaged one."""
    monkeypatch.setenv(tile_config.CONFIG_DIR_ENV, str(tmp_path))
    tile_config.clear_cache()
    yield tmp_path
    tile_config.clear_cache()


def _write(d, E, N, K, table, version=None, device="cpu", dtype=torch.float32):
    name = tile_config.config_file_name(E, N, K, device, dtype, version or tile_config.triton_version())
    (d / name).write_text(json.dumps({str(t): c for t, c in table.items()}))
    return name


def _cfg(m, **kw):
    return dict(BLOCK_M=m, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=2, **kw)


def test_file_name_is_the_key():
    assert (tile_config.config_file_name(8, 14336, 4096, "NVIDIA_H200", torch.bfloat16, "3.9.0")
            == "E=8,N=14336,K=4096,device_name=NVIDIA_H200,dtype=bfloat16,triton=3.9.0.json")
    assert tile_config._NAME_RE.match(
        tile_config.config_file_name(64, 1408, 2048, "NVIDIA_H100_80GB_HBM3", "float16", "3.7.0"))


def test_nearest_token_count(config_dir):
    _write(config_dir, 8, 24, 40, {1: _cfg(16), 4: _cfg(32), 16: _cfg(64)})
    get = lambda T: tile_config.get_config(T, 2, 8, 24, 40, torch.float32, "cpu")["BLOCK_M"]  # noqa: E731
    assert [get(T) for T in (1, 2, 3, 4, 9, 10, 11, 16, 5000)] == [16, 16, 32, 32, 32, 32, 64, 64, 64]


def test_shape_dtype_and_device_must_match(config_dir, caplog):
    _write(config_dir, 8, 24, 40, {1: _cfg(128)})
    _write(config_dir, 8, 24, 40, {1: _cfg(64)}, dtype=torch.float16)
    _write(config_dir, 8, 24, 40, {1: _cfg(32)}, device="NVIDIA_H200")
    assert tile_config.get_config(1, 2, 8, 24, 40, torch.float16, "cpu")["BLOCK_M"] == 64
    with caplog.at_level(logging.INFO, logger="fmoe.kernels.tile_config"):
        cfg = tile_config.get_config(1, 2, 8, 24, 48, torch.float32, "cpu", interpret=True)
    assert cfg == tile_config.default_config(1, 2, interpret=True)
    assert "no tuned config" in caplog.text and "N=24,K=48" in caplog.text


def test_slots_only_break_ties(config_dir):
    """One file for (N, K): resident (S = E) and offloaded (S = capacity) runs use the same tiles."""
    _write(config_dir, 64, 24, 40, {1: _cfg(32)})
    for S in (64, 16, 416):
        assert tile_config.get_config(1, 6, S, 24, 40, torch.float32, "cpu")["BLOCK_M"] == 32
    _write(config_dir, 8, 24, 40, {1: _cfg(16)})
    tile_config.clear_cache()
    assert tile_config.get_config(1, 6, 10, 24, 40, torch.float32, "cpu")["BLOCK_M"] == 16
    assert tile_config.get_config(1, 6, 60, 24, 40, torch.float32, "cpu")["BLOCK_M"] == 32


def test_same_triton_version_preferred(config_dir):
    _write(config_dir, 8, 24, 40, {1: _cfg(64)}, version="0.0.1")
    assert tile_config.get_config(1, 2, 8, 24, 40, torch.float32, "cpu")["BLOCK_M"] == 64
    _write(config_dir, 8, 24, 40, {1: _cfg(16)})
    tile_config.clear_cache()
    assert tile_config.get_config(1, 2, 8, 24, 40, torch.float32, "cpu")["BLOCK_M"] == 16


def test_missing_keys_come_from_defaults(config_dir):
    _write(config_dir, 8, 24, 40, {1: {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}})
    cfg = tile_config.get_config(1, 2, 8, 24, 40, torch.float32, "cpu")
    assert set(cfg) == set(tile_config.CONFIG_KEYS) and cfg["BLOCK_M"] == 32


@pytest.mark.parametrize("element_size", [2, 4])
def test_defaults_are_valid_gpu_tiles(element_size):
    """Defaults depend on T and K only, are tl.dot-sized, and fit the shared-memory budget."""
    for T in (1, 8, 64, 4096):
        cfg = tile_config.default_config(T, 2, element_size=element_size)
        assert set(cfg) == set(tile_config.CONFIG_KEYS)
        assert all(v >= 16 for k, v in cfg.items() if k.startswith("BLOCK"))
        staged = (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * element_size * cfg["num_stages"]
        assert staged <= tile_config.DEFAULT_SMEM_BUDGET


def test_packaged_configs_parse():
    """Every JSON shipped in fmoe/kernels/configs is named as a key and maps T -> full config."""
    for path in tile_config.CONFIG_DIR.glob("*.json"):
        assert tile_config._NAME_RE.match(path.name), path.name
        table = json.loads(path.read_text())
        for t, cfg in table.items():
            assert int(t) >= 1 and {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(cfg)
