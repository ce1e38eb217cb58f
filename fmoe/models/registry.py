"""`model_type` -> family. A new family plugs in with one entry here and one file beside it.

A family module provides a frozen config dataclass with ``from_hf(dict)``, ``experts``
(an `ExpertShape`), ``expert_keys(moe_layer, expert)``, ``fused_expert_keys(moe_layer)`` and
``checkpoint_renames`` (optionally ``checkpoint_ignore``: regexes of checkpoint names the
family does not use); and a model `nn.Module` with ``moe_blocks()``, ``new_cache()`` and
``forward(input_ids, positions=, cache=, key_valid=, last_only=)``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from ..errors import ConfigError


@dataclass(frozen=True)
class Family:
    module: str          # fmoe.models.<file>
    config: str          # config class name
    model: str           # model class name

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.model)


FAMILIES: dict[str, Family] = {
    "mixtral": Family("fmoe.models.mixtral", "MixtralConfig", "MixtralForCausalLM"),
    "qwen2_moe": Family("fmoe.models.qwen2_moe", "Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "qwen3_moe": Family("fmoe.models.qwen3_moe", "Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
    "deepseek_v2": Family("fmoe.models.deepseek_v2", "DeepseekV2Config", "DeepseekV2ForCausalLM"),
    "deepseek_v3": Family("fmoe.models.deepseek_v2", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
    # moonshotai/Kimi-K2-*: DeepSeek-V3's architecture under its own model_type
    "kimi_k2": Family("fmoe.models.deepseek_v2", "DeepseekV3Config", "DeepseekV3ForCausalLM"),
}


def family_for(model_type: str | None, source: str | None = None) -> Family:
    """The family of `model_type`; ConfigError naming `source` (the config.json) when it has
    none or one fmoe does not know."""
    if model_type not in FAMILIES:
        where = f"{source}: " if source else ""
        what = "no model_type" if model_type is None else f"unknown model_type {model_type!r}"
        raise ConfigError(f"{where}{what}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[model_type]
