"""Every use of transformers internals, in one place, checked against the tested transformers version.

moeprune leans on parts of transformers that are not public API: the checkpoint key conversion that
`from_pretrained` and `save_pretrained` use, the grouped_mm experts kernel and its dispatch
registry, the decoder-layer base class, and a few private attributes of the experts modules. They
change between minor releases, so they are reached only through this module: when a new
transformers moves one, this is the file to update, and the version check below says so at once.

Public APIs (AutoConfig, AutoModelForCausalLM, PreTrainedModel, logging) are used where they are
needed, not here.
"""

from __future__ import annotations

import functools
import sys

import transformers

# ---- version check (arch-compat) ------------------------------------------------------------------
# The pin in pyproject.toml is `transformers>=5.23,<5.24`; tests/test_compat.py keeps the two equal.
TESTED_TRANSFORMERS = (5, 23)


def version_warning(installed: str | None = None) -> str | None:
    """The one-line warning for an installed transformers outside the tested minor release, else None.

    Only major.minor is compared: a patch release (5.23.4) or a pre-release of it is the tested line.
    """
    installed = installed or transformers.__version__
    parts = installed.split(".")
    try:
        found = (int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or "x"))
    except (IndexError, ValueError):
        found = None
    if found == TESTED_TRANSFORMERS:
        return None
    tested = ".".join(map(str, TESTED_TRANSFORMERS))
    return (f"moeprune: warning: transformers {installed} is installed, but moeprune is tested with "
            f"transformers {tested}.x; its checkpoint conversion and expert kernels may not match "
            f"(install 'transformers>={tested},<{TESTED_TRANSFORMERS[0]}.{TESTED_TRANSFORMERS[1] + 1}')")


_warning = version_warning()
if _warning is not None:  # a warning, not an error: a newer release may well still work
    print(_warning, file=sys.stderr)


# ---- decoder layers (arch-compat) -----------------------------------------------------------------
from transformers.modeling_layers import GradientCheckpointingLayer  # noqa: E402


def is_decoder_layer(module) -> bool:
    """Whether `module` is one of transformers' decoder layers (they all derive this base class)."""
    return isinstance(module, GradientCheckpointingLayer)


# ---- checkpoint key conversion (arch-compat) ------------------------------------------------------
# The functions `from_pretrained` / `save_pretrained` use (PEFT uses them too) to map on-disk
# per-expert keys to the fused in-memory tensors and back.


def conversion_mapping(model) -> list:
    """The model's weight conversions (renamings and converters), as `from_pretrained` builds them."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model)


def in_model_names(model, keys, conversion: list, meta_state: dict) -> dict[str, str]:
    """On-disk key -> the name of the model tensor it lands in, for every key of `keys`."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [c for c in conversion if isinstance(c, WeightRenaming)]
    converters = [c for c in conversion if isinstance(c, WeightConverter)]
    prefix = model.base_model_prefix

    def target(k: str) -> str:
        renamed = rename_source_key(k, renamings, converters, prefix, meta_state)[0]
        if renamed not in meta_state and k in meta_state:  # as the loader does: a key already in place
            return rename_source_key(k, [], [], prefix, meta_state)[0]  # (DeepSeek-V4's `model.norm`)
        return renamed

    return {k: target(k) for k in keys}


def in_model_targets(model, keys, conversion: list, meta_state: dict) -> set[str]:
    """Every model tensor that `keys` fill. `in_model_names` gives a one-to-many converter's first target
    only (Inkling's `shared_w13_weight` -> `gate_proj`, `up_proj`); here its other targets count too."""
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    renamings = [c for c in conversion if isinstance(c, WeightRenaming)]
    converters = [c for c in conversion if isinstance(c, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = in_model_names(model, keys, conversion, meta_state)
    found = set(names.values())
    for k, name in names.items():
        pattern = rename_source_key(k, renamings, converters, model.base_model_prefix, meta_state)[1]
        c = by_pattern.get(pattern)
        if c is not None and len(c.target_patterns) > 1:
            first = c.target_patterns[0]
            head, sep, tail = name.rpartition(first)
            found.update(head + t + tail for t in c.target_patterns[1:] if sep)
    return found


def load_converted(model, state: dict, conversion: list):
    """Load on-disk `state` into `model` through `conversion`; the loader's info (unexpected,
    mismatched keys, conversion errors)."""
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    config = LoadStateDictConfig(weight_mapping=conversion)
    info, _ = convert_and_load_state_dict_in_model(model, state, config)
    return info


def on_disk_names(model, state: dict) -> dict:
    """In-memory `state` of `model` back in its on-disk key layout (what `save_pretrained` writes)."""
    from transformers.core_model_loading import revert_weight_conversion

    return revert_weight_conversion(model, state)


# ---- grouped_mm experts kernel (arch-compat) ------------------------------------------------------
# The observer follows transformers' `grouped_mm_experts_forward` step for step; these are the
# pieces of `transformers.integrations.moe` it needs, and the private attributes of the experts
# modules that `use_experts_implementation` adds.

try:
    from transformers.integrations import moe as _moe
except ImportError:  # pragma: no cover - other transformers layouts take the generic observer path
    _moe = None

_MOE_NAMES = ("ALL_EXPERTS_FUNCTIONS", "grouped_mm_experts_forward", "_grouped_linear",
              "use_experts_implementation")
HAS_GROUPED_MM = _moe is not None and all(hasattr(_moe, name) for name in _MOE_NAMES)
# flags `use_experts_implementation` sets on every experts module it wraps
_EXPERTS_FLAGS = ("has_gate", "has_bias", "has_post_expert_norm", "is_transposed", "num_experts")


def experts_implementation(experts) -> str | None:
    """The experts implementation an experts module dispatches to ("grouped_mm", "eager", ...), or None."""
    return config_experts_implementation(getattr(experts, "config", None))


def config_experts_implementation(config) -> str | None:
    """The experts implementation a model config selects (the private `_experts_implementation`), or None."""
    return getattr(config, "_experts_implementation", None)


def set_config_experts_implementation(config, name: str) -> None:
    """Select experts implementation `name` in a config before a model is built from it."""
    config._experts_implementation = name


def runs_builtin_grouped_mm(experts) -> bool:
    """Whether `experts` runs exactly transformers' built-in grouped_mm forward.

    That is: its class is wrapped by `use_experts_implementation` (and does not override the
    dispatching forward), its config selects "grouped_mm", that name still maps to the built-in
    function, and expert parallelism is off.
    """
    if not HAS_GROUPED_MM:
        return False
    if experts_implementation(experts) != "grouped_mm" or getattr(experts, "_is_expert_parallel", True):
        return False
    if _moe.ALL_EXPERTS_FUNCTIONS.get("grouped_mm") is not _moe.grouped_mm_experts_forward:
        return False
    if getattr(type(experts).forward, "__code__", None) is not _dispatching_forward_code():
        return False
    return all(hasattr(experts, f) for f in _EXPERTS_FLAGS)


_dispatch_code = []  # the code object, found once


def _dispatching_forward_code():
    """The code object of the forward `use_experts_implementation` installs (shared by all classes)."""
    if not _dispatch_code:
        import torch

        class _Stub(torch.nn.Module):  # only its wrapped forward's code object is read; it never runs
            def forward(self, *args):  # pragma: no cover
                return args

        _dispatch_code.append(_moe.use_experts_implementation(_Stub).forward.__code__)
    return _dispatch_code[0]


def grouped_linear(x, weight, offsets, *, bias=None, is_transposed: bool = False):
    """transformers' grouped linear: rows of x [S, in] sorted by expert, `offsets` [E] cumulative counts."""
    return _moe._grouped_linear(x, weight, offsets, bias=bias, is_transposed=is_transposed)


def activation(name):
    """transformers' activation function called `name` (a config's `hidden_act`), or None if unknown."""
    from transformers.activations import ACT2FN

    return ACT2FN[name] if isinstance(name, str) and name in ACT2FN else None


def apply_gate(experts, h):
    """The experts module's gating of h [S, 2I] -> [S, I] (the private `_apply_gate` the wrapper adds)."""
    return experts._apply_gate(h)


# ---- experts implementations (novices) --------------------------------------------------------
# transformers' `use_experts_implementation` replaces an experts class's forward by a wrapper that
# looks up `config._experts_implementation` in `ALL_EXPERTS_FUNCTIONS` (the undecorated forward is
# the wrapper's `__wrapped__`, which "eager" runs). moeprune registers one key per implementation it
# wraps, "<tag>:<base>", so the configured value itself says which kernel runs under the variant.


def dispatches_experts(experts) -> bool:
    """Whether `experts` runs through `ALL_EXPERTS_FUNCTIONS` (its class is
    `use_experts_implementation`'s)."""
    return hasattr(type(experts).forward, "__wrapped__") and hasattr(experts, "config")


def experts_kernel(experts, implementation: str | None):
    """The registered forward `implementation` names for `experts` (its own forward for "eager")."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS.get_interface(implementation, type(experts).forward.__wrapped__)


def route_experts_through(experts, tag: str, variant) -> None:
    """Make every experts module sharing `experts.config` run `variant(module, kernel, *args)`.

    `kernel` is the implementation configured before (eager, grouped_mm, ...), so a variant that
    hands its work to the kernel computes what the model computed before. This sets the config's
    `_experts_implementation` to "<tag>:<base>" (not serialised by `save_pretrained`);
    `restore_experts_implementation` puts the base back. Registering the key is additive.
    """
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    config = experts.config
    current = config._experts_implementation
    if isinstance(current, str) and current.startswith(tag + ":"):
        return  # a module sharing this config routed it already
    key = f"{tag}:{current}"
    if key not in ALL_EXPERTS_FUNCTIONS:
        def forward(module, *args, **kwargs):
            return variant(module, experts_kernel(module, current), *args, **kwargs)

        ALL_EXPERTS_FUNCTIONS[key] = forward
    # the internal field: the public setter would also rewrite any sub-configs
    config._experts_implementation_internal = key


def restore_experts_implementation(experts, tag: str) -> None:
    """Undo `route_experts_through(experts, tag, ...)`: the config's implementation goes back to its base."""
    current = experts.config._experts_implementation
    if isinstance(current, str) and current.startswith(tag + ":"):
        base = current[len(tag) + 1:]
        experts.config._experts_implementation_internal = None if base == "None" else base


def decode_config_floats(d: dict) -> dict:
    """A config.json dict with transformers' tagged floats (`{"__float__": "Infinity"}`, written for Mamba
    `time_step_limit`) turned back into floats, as `from_pretrained` does before building the config."""
    from transformers import PreTrainedConfig

    return PreTrainedConfig._decode_special_floats(d)


def ignored_on_load(model) -> list[str]:
    """Regexes of on-disk keys `from_pretrained` drops silently for this model class (an MTP stack it does not
    build): its `_keys_to_ignore_on_load_unexpected`."""
    return list(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])


def config_class(model_type: str):
    """The transformers config class registered for `model_type`, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None


# ---- which class a checkpoint loads as ----------------------------------------------------------
# A checkpoint is written as the class it was read as: a vision-language checkpoint stays a
# `...ForConditionalGeneration` (loaded by `AutoModelForImageTextToText`), a text one a `...ForCausalLM`.
# The Auto mappings, tried in this order, name the class and the Auto class users load it with.
_AUTO_MAPPINGS = (
    ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING"),
    ("AutoModelForImageTextToText", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING"),
    ("AutoModelForMultimodalLM", "MODEL_FOR_MULTIMODAL_LM_MAPPING"),
)


def auto_classes(config) -> list[tuple[str, type]]:
    """(Auto class name, model class) pairs that can build `config`, in `_AUTO_MAPPINGS` order."""
    from transformers.models.auto import modeling_auto

    found = []
    for auto_name, mapping_name in _AUTO_MAPPINGS:
        mapping = getattr(modeling_auto, mapping_name, None)
        if mapping is None:
            continue
        try:
            found.append((auto_name, mapping[type(config)]))
        except (KeyError, ValueError):
            continue
    return found


def every_model_class(config) -> list[str]:
    """Names of every class any transformers Auto mapping builds `config` as (a token classifier, a
    bare encoder), for saying what a model is when moeprune cannot load it."""
    from transformers.models.auto import modeling_auto

    names = set()
    for attr in dir(modeling_auto):
        mapping = getattr(modeling_auto, attr)
        if attr.startswith("MODEL_") and attr.endswith("_MAPPING") and hasattr(mapping, "_model_mapping"):
            try:
                names.add(mapping[type(config)].__name__)
            except (KeyError, ValueError, AttributeError):
                continue
    return sorted(names)


def defining_model_type(model_type: str) -> str | None:
    """The model type whose transformers module defines `model_type`, where that differs (a text config
    defined only as part of a vision-language model, e.g. "step3p5" in "step3p7"), else None."""
    from transformers.models.auto.configuration_auto import SPECIAL_MODEL_TYPE_TO_MODULE_NAME

    owner = SPECIAL_MODEL_TYPE_TO_MODULE_NAME.get(model_type)
    return owner if owner and owner != model_type else None


def model_class(config) -> tuple[str, type]:
    """(Auto class name, model class) that `config` loads as.

    The class named in `config.architectures` wins when an Auto mapping offers it (so a checkpoint
    saved as `Qwen3VLMoeForConditionalGeneration` is rebuilt as that, not as its text-only causal LM);
    otherwise the first Auto mapping that knows the config.
    """
    import transformers

    candidates = auto_classes(config)
    for arch in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, arch, None)
        for auto_name, mapped in candidates:
            if cls is mapped:
                return auto_name, cls
        if isinstance(cls, type) and candidates:  # e.g. a ...ForCausalLM of a multimodal config
            return candidates[0][0], cls
    if not candidates:
        raise LookupError(f"transformers {transformers.__version__} has no causal or image-text-to-text "
                          f"model class for model_type {getattr(config, 'model_type', None)!r}")
    return candidates[0]


def experts_layout(experts) -> dict | None:
    """The layout flags `use_experts_implementation` puts on a dispatched experts module, or None."""
    if not all(hasattr(experts, f) for f in ("has_gate", "is_transposed", "is_concatenated")):
        return None
    return {f: bool(getattr(experts, f, False)) for f in
            ("has_gate", "has_bias", "is_transposed", "is_concatenated", "has_post_expert_norm")}


def recorded_routers(config) -> dict[type, int]:
    """Router class -> index of its logits, from `_can_record_outputs["router_logits"]` of every model
    class in the modeling module `config` loads with (the text sub-model declares it for VLMs)."""
    try:
        _, cls = model_class(config)
    except LookupError:
        return {}
    return _recorded_routers_of(sys.modules[cls.__module__])


@functools.cache
def _recorded_routers_of(module) -> dict[type, int]:
    found: dict[type, int] = {}
    for value in vars(module).values():
        recorders = getattr(value, "_can_record_outputs", None) if isinstance(value, type) else None
        declared = (recorders or {}).get("router_logits") if isinstance(recorders, dict) else None
        for recorder in declared if isinstance(declared, (list, tuple)) else [declared]:
            target = getattr(recorder, "target_class", recorder)
            if isinstance(target, type):
                found.setdefault(target, int(getattr(recorder, "index", 0) or 0))
    return found
