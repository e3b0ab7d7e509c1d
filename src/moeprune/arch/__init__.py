"""One adapter per model family, behind one registry.

`get_adapter(config)` returns the adapter for a transformers config (a vision-language config is read
through its text config), or raises a one-line error that says what is missing. The adapter derives
what transformers declares (`arch.base.Adapter`); `arch.facts.FAMILIES` holds the rest, as data.
"""

from __future__ import annotations

from moeprune import compat
from moeprune.arch.base import COUNT_FIELDS, Adapter, ExpertWeights, decoder_layers, text_config
from moeprune.arch.facts import BY_MODEL_TYPE, FAMILIES, Family
from moeprune.errors import MoepruneError

SUPPORTED_MODEL_TYPES = tuple(sorted(mt for mt, f in BY_MODEL_TYPE.items() if f.refused is None))


def family_of(config) -> Family | None:
    """The facts row for `config`: by its own model_type, else by its text config's."""
    for candidate in (config, text_config(config)):
        found = BY_MODEL_TYPE.get(getattr(candidate, "model_type", None))
        if found is not None:
            return found
    return None


def get_adapter(config) -> Adapter:
    """The adapter for `config` (a transformers PretrainedConfig)."""
    row = family_of(config)
    if row is None:
        raise MoepruneError(_unsupported(config))
    if row.refused is not None:
        raise MoepruneError(f"unsupported model_type {getattr(config, 'model_type', None)!r}: {row.refused}")
    if not compat.auto_classes(config):  # e.g. a bare glm4v_moe_text config: a base model with no LM head
        raise MoepruneError(_no_language_model_head(config))
    return (row.adapter or Adapter)(config, row)


def _unsupported(config) -> str:
    """One line: which model_type, and what it lacks to be supported."""
    model_type = getattr(config, "model_type", None)
    if getattr(config, "is_encoder_decoder", False):
        return (f"unsupported model_type {model_type!r}: it is an encoder-decoder model; moeprune prunes the "
                "routed experts of decoder-only (causal LM) models")
    if not compat.auto_classes(config):  # a tower or a text config that only ships inside its wrapper
        return _no_language_model_head(config)
    text = text_config(config)
    has_count = any(isinstance(_field(text, f), int) for f in COUNT_FIELDS)
    if not has_count:
        nested = _nested_count_field(config.to_dict() if hasattr(config, "to_dict") else {})
        if nested:
            return (f"unsupported model_type {model_type!r}: its expert count sits in the nested config "
                    f"field {nested}, which moeprune does not read; it needs a row in moeprune/arch/facts.py")
        return (f"unsupported model_type {model_type!r}: its config has no routed-expert count "
                f"({', '.join(COUNT_FIELDS)}), so it is not a Mixture-of-Experts model moeprune can prune")
    return (f"unsupported model_type {model_type!r}: it has routed experts but no row in moeprune's family "
            f"table (moeprune/arch/facts.py) saying how its router forms gates; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}")


def _no_language_model_head(config) -> str:
    """One line for a model type transformers builds with no language-model head (a text config that only
    ships inside a vision-language checkpoint, a token classifier)."""
    model_type = getattr(config, "model_type", None)
    others = compat.every_model_class(config)
    owner = compat.defining_model_type(model_type)
    hint = (f"; its checkpoints ship as {owner!r}, which moeprune prunes: prune that checkpoint"
            if owner in SUPPORTED_MODEL_TYPES else "")
    return (f"unsupported model_type {model_type!r}: transformers has no class with a language-model "
            f"head for it (no causal-LM or image-text-to-text class; "
            f"{'only ' + ', '.join(others) if others else 'no model class at all'}), so no checkpoint "
            f"loads as it and moeprune cannot write one back{hint}")


def _field(config, name: str):
    """config.name, or None where it is absent or, as in a per-layer config (dots.3's vision encoder), a
    global read of it is refused."""
    try:
        return getattr(config, name, None)
    except Exception:  # transformers' AmbiguousGlobalPerLayerAttributeError derives no common base
        return None


def _nested_count_field(d: dict, prefix: str = "") -> str | None:
    for key, value in d.items():
        if isinstance(value, dict):
            for field in COUNT_FIELDS + ("moe_num_experts", "num_local_experts"):
                if isinstance(value.get(field), int):
                    return f"{prefix}{key}.{field}"
            found = _nested_count_field(value, f"{prefix}{key}.")
            if found:
                return found
    return None


__all__ = ["FAMILIES", "SUPPORTED_MODEL_TYPES", "Adapter", "ExpertWeights", "Family", "decoder_layers",
           "family_of", "get_adapter", "text_config"]
