"""Every model type transformers 5.23 ships with routed experts (a count field anywhere in its default config)
gets an adapter or one line saying why not: never a traceback from deeper down."""

from __future__ import annotations

import warnings

import pytest
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from moeprune.arch import SUPPORTED_MODEL_TYPES, get_adapter
from moeprune.arch.base import COUNT_FIELDS
from moeprune.errors import MoepruneError


def _has_experts(d, depth=0) -> bool:
    for key, value in d.items():
        if key in COUNT_FIELDS and isinstance(value, int) and value > 1:
            return True
        if isinstance(value, dict) and depth < 3 and _has_experts(value, depth + 1):
            return True
        if isinstance(value, list) and depth < 3:  # per-layer configs
            if any(isinstance(v, dict) and _has_experts(v, depth + 1) for v in value):
                return True
    return False


def _moe_types() -> dict[str, tf.PretrainedConfig]:
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model_type in CONFIG_MAPPING.keys():
            try:
                config = CONFIG_MAPPING[model_type]()
            except Exception:  # noqa: BLE001 - a config class that needs arguments is not one users hold bare
                continue
            if _has_experts(config.to_dict()):
                found[model_type] = config
    return found


@pytest.mark.slow  # builds ~100 default configs (15 s)
def test_every_moe_type_gets_an_adapter_or_one_line():
    types = _moe_types()
    assert len(types) >= 68, sorted(types)
    answered, refused = [], {}
    for model_type, config in sorted(types.items()):
        try:
            get_adapter(config)
            answered.append(model_type)
        except MoepruneError as e:
            assert "\n" not in str(e) and model_type.split("_text")[0] in str(e), (model_type, e)
            refused[model_type] = str(e)
    # a supported type is refused on its default config only where that config is dense (Gemma 4 without its
    # MoE block, DeepSeek-V2 with no top-k) or is a text config that ships inside its wrapper
    for model_type in set(refused) & set(SUPPORTED_MODEL_TYPES):
        why = refused[model_type]
        assert "language-model head" in why or "field" in why, (model_type, why)
    assert {"jetmoe", "doge", "switch_transformers", "openai_privacy_filter"} <= set(refused)
    assert len(answered) >= 60
