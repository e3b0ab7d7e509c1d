"""One adapter per model family, behind one registry.

`get_adapter(config)` returns the adapter for a transformers config, or raises a one-line error that
lists the supported `model_type`s. Everything family-specific lives in these adapters; the observer,
the methods and the surgery only talk to the adapter interface in `base.py`.
"""

from __future__ import annotations

from moeprune.arch.base import Adapter, ExpertWeights, decoder_layers
from moeprune.arch.families import ADAPTERS
from moeprune.errors import MoepruneError

SUPPORTED_MODEL_TYPES = tuple(sorted(mt for cls in ADAPTERS for mt in cls.model_types))


def get_adapter(config) -> Adapter:
    """The adapter for `config` (a transformers PretrainedConfig)."""
    model_type = getattr(config, "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(config)
    raise MoepruneError(
        f"unsupported model_type {model_type!r}: moeprune supports {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


__all__ = ["SUPPORTED_MODEL_TYPES", "Adapter", "ExpertWeights", "decoder_layers", "get_adapter"]
