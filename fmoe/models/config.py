"""Helpers shared by the family configs: reading HF ``config.json`` fields in both spellings."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings. `type` is "default", "linear", "dynamic" or "yarn";
    `scaling` holds the type's extra fields (factor, original_max_position_embeddings, ...)."""

    theta: float = 10000.0
    type: str = "default"
    scaling: tuple[tuple[str, Any], ...] = ()

    def get(self, key: str, default=None):
        return dict(self.scaling).get(key, default)


def read_rope(cfg: dict, default_theta: float = 10000.0) -> RopeConfig:
    """Accept transformers >= 5 ``rope_parameters`` and the hub's ``rope_theta``/``rope_scaling``."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:
        theta = params["rope_theta"]
        extra = {k: v for k, v in params.items() if k not in ("rope_theta",)}
    else:
        theta = cfg.get("rope_theta", default_theta)
        extra = dict(cfg.get("rope_scaling") or {})
    rtype = extra.pop("rope_type", None) or extra.pop("type", None) or "default"
    extra.pop("type", None)
    if rtype not in ("default", "linear", "dynamic", "yarn"):
        raise ConfigError(f"unsupported rope type {rtype!r}")
    return RopeConfig(float(theta), rtype, tuple(sorted(extra.items())))


def require(cfg: dict, *keys: str, model_type: str = "") -> list:
    """Values of `keys`, or a ConfigError naming every missing one."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config.json ({model_type}) lacks required field(s): {', '.join(missing)}")
    return [cfg[k] for k in keys]


def first(cfg: dict, *keys: str, default=None):
    """The first of `keys` present (not None) in `cfg`: for fields spelled two ways."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def read_config_json(root: Path) -> dict:
    path = Path(root) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: missing")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return cfg
