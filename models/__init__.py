"""Model families: each a module with the same small surface, picked by a config's `architecture`.

A family module provides
    a frozen config dataclass answering to `architecture`, `vocab_size`, `num_layers`,
        `num_heads`, `num_kv_heads`, `head_dim`, `hidden_size`, `mlp_dim`, `max_positions`,
        `layer_matmul_params`, `model_type`, `eos_token_ids`,
        `dtype`, `jnp_dtype`, `bos_token_id`, `eos_token_id`, `num_params()`,
        `replace(num_layers=...)`, `to_json()`, `from_dict()`;
    `LAYERS` (the key of the stacked layer params), `LINEAR_INPUTS` and `head_key(config)`
    (the dense weights and LM head table that --matmul-backend cpu packs), `LAYER_NORMS` and
    `FINAL_NORM` (the norms it hands the norm kernel), `param_axes(config)`, `init_params`,
    `abstract_params`, `stage_keys(config, first, last)`, and the forward pass as pure
    functions: `embed`, `decoder`, `lm_head`, `unstack_layers`; and `PRESETS`.

docs/models.md says how to add one.
"""
from __future__ import annotations

from types import ModuleType
from typing import Any

from . import decoder, gpt2

FAMILIES: dict[str, ModuleType] = {gpt2.ARCHITECTURE: gpt2, decoder.ARCHITECTURE: decoder}

# Every named model shape (random weights): bench, plan and tests pick them by name.
PRESETS: dict[str, Any] = {**gpt2.PRESETS, **decoder.PRESETS}


def family(config) -> ModuleType:
    """The module that runs `config`."""
    return FAMILIES[config.architecture]


def config_from_dict(d: dict[str, Any]):
    """A model config from the dict of an orca-jax config.json (its `architecture` picks the family)."""
    arch = d.get("architecture")
    if arch not in FAMILIES:
        raise ValueError(f"architecture {arch!r} is not supported; supported: {sorted(FAMILIES)}")
    cls = gpt2.GPTConfig if arch == gpt2.ARCHITECTURE else decoder.DecoderConfig
    return cls.from_dict(d)


def preset(name: str):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]
