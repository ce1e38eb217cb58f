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
    """The hub's ``rope_theta``/``rope_scaling`` and transformers >= 5 ``rope_parameters``, with
    transformers' precedence: ``rope_scaling`` over ``rope_parameters``; the theta inside them,
    else the top-level ``rope_theta``, else the class default; a top-level
    ``original_max_position_embeddings`` (Phi-3's spelling) over the nested one for yarn."""
    params = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"rope_scaling / rope_parameters must be an object, got {params!r}")
    extra = dict(params)
    theta = extra.pop("rope_theta", None)
    if theta is None:
        theta = cfg.get("rope_theta", default_theta)
    rtype = extra.pop("rope_type", None) or extra.pop("type", None) or "default"
    extra.pop("type", None)
    if rtype not in ("default", "linear", "dynamic", "yarn"):
        raise ConfigError(f"unsupported rope type {rtype!r}")
    if rtype == "yarn" and cfg.get("original_max_position_embeddings") is not None:
        extra["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
    return RopeConfig(float(theta), rtype, tuple(sorted(extra.items())))


def require(cfg: dict, *keys: str, model_type: str = "") -> list:
    """Values of `keys`, or a ConfigError naming every missing one."""
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ConfigError(f"config.json ({model_type}) lacks required field(s): {', '.join(missing)}")
    return [cfg[k] for k in keys]


def hf_default(cfg: dict, key: str, absent, null=None):
    """`cfg[key]` as transformers reads it: a key the file leaves out takes the config class's
    default (`absent`, which is what HF computes with); one written as null takes `null`."""
    if key not in cfg:
        return absent
    v = cfg[key]
    return null if v is None else v


def check_activation(cfg: dict, model_type: str = "") -> None:
    """Every family computes SwiGLU experts and MLPs: a config asking for another activation is
    refused, not run with SiLU."""
    act = cfg.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"config.json ({model_type}): hidden_act {act!r} is not supported; fmoe "
                          f"computes SiLU-gated MLPs (hidden_act 'silu')")


def first(cfg: dict, *keys: str, default=None):
    """The first of `keys` present (not None) in `cfg`: for fields spelled two ways."""
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def read_config_json(root: Path) -> dict:
    """``root/config.json`` as a dict; `ConfigError` naming the file when missing or malformed."""
    path = Path(root) / "config.json"
    if not path.exists():
        raise ConfigError(f"{path}: missing")
    return read_json_object(path)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold one object; `ConfigError` naming the file otherwise."""
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return cfg


# -- validation ----------------------------------------------------------------------------------
# Every field a family reads is checked at load, before any module is built, and an error names
# the file and the field. Sizes and counts are integers >= 1 unless listed here (>= 0).
_ZERO_OK = {"n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers",
            "shared_expert_intermediate_size", "sliding_window"}
# raw config.json fields read under another name (or into a nested object) by `from_hf`
_RAW_ALIASES = {"num_local_experts": "int", "num_experts": "int", "rope_theta": "float",
                "moe_intermediate_size": "int", "head_dim": "int | None"}


def _bad(where: str, field: str, value, expected: str) -> ConfigError:
    return ConfigError(f"{where}: field {field!r} is {json.dumps(value) if _jsonable(value) else repr(value)}; "
                       f"expected {expected}")


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_value(where: str, name: str, value, kind: str) -> None:
    """`kind` is the dataclass annotation (a string: the families use postponed annotations)."""
    kind = kind.replace(" ", "")
    optional = kind.endswith("|None")
    base = kind[:-5] if optional else kind
    if value is None:
        if optional:
            return
        raise _bad(where, name, value, f"a value ({base.replace('|', ' or ')}), not null")
    if name.endswith("_token_id"):
        ok = (_is_int(value) and value >= 0) or (
            isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value))
        if not ok:
            raise _bad(where, name, value, "a token id (an integer >= 0) or a list of them")
        return
    if base == "int":
        lo = 0 if name in _ZERO_OK else 1
        if not _is_int(value) or value < lo:
            raise _bad(where, name, value, f"an integer >= {lo}")
    elif base == "float":
        if not _is_real(value) or value <= 0:
            raise _bad(where, name, value, "a finite number > 0")
    elif base == "bool":
        if not isinstance(value, bool):
            raise _bad(where, name, value, "true or false")
    elif base == "str":
        if not isinstance(value, str):
            raise _bad(where, name, value, "a string")
    elif base.startswith("tuple[int"):
        if not isinstance(value, (list, tuple)) or not all(_is_int(v) and v >= 0 for v in value):
            raise _bad(where, name, value, "a list of layer indices (integers >= 0)")


def check_raw_config(raw: dict, config_cls, where: str) -> None:
    """Check the config.json fields `config_cls` reads, before `from_hf` touches them."""
    import dataclasses

    kinds = {f.name: str(f.type) for f in dataclasses.fields(config_cls)}
    for name, kind in {**_RAW_ALIASES, **kinds}.items():
        if name not in raw or name in ("rope", "model_type"):
            continue
        if raw[name] is None:
            continue             # null: `from_hf` may take a default; the built config is checked
        _check_value(where, name, raw[name], kind)
    rs = raw.get("rope_scaling")
    if rs is not None and not isinstance(rs, dict):
        raise _bad(where, "rope_scaling", rs, "an object or null")
    rp = raw.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise _bad(where, "rope_parameters", rp, "an object or null")
    for src, obj in (("rope_scaling", rs), ("rope_parameters", rp)):
        for k, v in (obj or {}).items():
            if k in ("factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "rope_theta",
                     "original_max_position_embeddings") and v is not None and not _is_real(v):
                raise _bad(where, f"{src}.{k}", v, "a finite number")


def check_config(cfg, where: str) -> None:
    """Check the built config: every field's type and range, and the relations between fields."""
    import dataclasses

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "rope":
            if not _is_real(v.theta) or v.theta <= 0:
                raise _bad(where, "rope_theta", v.theta, "a finite number > 0")
            continue
        _check_value(where, f.name, list(v) if isinstance(v, tuple) else v, str(f.type))
    shp = cfg.experts
    if shp.top_k > shp.num_experts:
        raise ConfigError(f"{where}: field 'num_experts_per_tok' is {shp.top_k}, more than the "
                          f"{shp.num_experts} routed experts per layer")
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    if heads and kv and heads % kv:
        raise ConfigError(f"{where}: field 'num_attention_heads' ({heads}) is not a multiple of "
                          f"'num_key_value_heads' ({kv})")
    L = cfg.num_hidden_layers
    bad = [i for i in getattr(cfg, "moe_layer_ids", []) if not 0 <= i < L]
    if bad or not list(getattr(cfg, "moe_layer_ids", [0])):
        raise ConfigError(f"{where}: the fields that place MoE layers (first_k_dense_replace, "
                          f"mlp_only_layers, decoder_sparse_step, ...) leave no valid MoE layer "
                          f"among {L} layers")


def build_config(config_cls, raw: dict, where: str):
    """`config_cls.from_hf(raw)` with every field checked; errors name `where` and the field."""
    check_raw_config(raw, config_cls, where)
    try:
        cfg = config_cls.from_hf(raw)
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (TypeError, ValueError, KeyError, AttributeError, ZeroDivisionError) as e:
        raise ConfigError(f"{where}: invalid value ({type(e).__name__}: {e})") from None
    check_config(cfg, where)
    return cfg
