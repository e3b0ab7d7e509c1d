"""The transformers internals moeprune relies on, in one place, so a transformers upgrade breaks here."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


# ---- experts implementations (novices) --------------------------------------------------------
# transformers' `use_experts_implementation` replaces an experts class's forward by a wrapper that
# looks up `config._experts_implementation` in `ALL_EXPERTS_FUNCTIONS` (the undecorated forward is
# the wrapper's `__wrapped__`, which "eager" runs). moeprune registers one key per implementation it
# wraps, "<tag>:<base>", so the configured value itself says which kernel runs under the variant.


def dispatches_experts(experts: nn.Module) -> bool:
    """Whether `experts` runs through `ALL_EXPERTS_FUNCTIONS` (its class is `use_experts_implementation`'s)."""
    return hasattr(type(experts).forward, "__wrapped__") and hasattr(experts, "config")


def experts_kernel(experts: nn.Module, implementation: str | None) -> Callable:
    """The registered forward `implementation` names for `experts` (its own forward for "eager")."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    return ALL_EXPERTS_FUNCTIONS.get_interface(implementation, type(experts).forward.__wrapped__)


def route_experts_through(experts: nn.Module, tag: str, variant: Callable) -> None:
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


def restore_experts_implementation(experts: nn.Module, tag: str) -> None:
    """Undo `route_experts_through(experts, tag, ...)`: the config's implementation goes back to its base."""
    current = experts.config._experts_implementation
    if isinstance(current, str) and current.startswith(tag + ":"):
        base = current[len(tag) + 1:]
        experts.config._experts_implementation_internal = None if base == "None" else base


def config_class(model_type: str):
    """The transformers config class registered for `model_type`, or None."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type] if model_type in CONFIG_MAPPING else None
