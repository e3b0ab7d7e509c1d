"""A checkpoint read one decoder layer at a time into a weightless skeleton of its model.

The skeleton is the family's own model class built under `accelerate.init_empty_weights` (parameters
on the meta device, buffers such as RoPE frequencies real), so every forward, router and expert
kernel is transformers' own. Weights come straight from the safetensors shards through
transformers' key conversion (`get_model_conversion_mapping` + `convert_and_load_state_dict_in_model`,
the code `from_pretrained` uses), so on-disk per-expert keys (`experts.7.w1.weight`, ...) land in
the fused in-memory tensors without any per-family key rules here. A layer is freed by putting its
tensors back on the meta device, which releases both its memory and its hold on the shard mapping.

These are transformers internals (pinned in pyproject), reached through `moeprune.compat`; they are the same
functions PEFT uses.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from moeprune import compat
from moeprune.arch import decoder_layers, get_adapter
from moeprune.errors import MoepruneError
from moeprune.runtime import quiet_transformers
from moeprune.store.files import checkpoint_dtype, weight_map
from moeprune.store.mtp import MtpCarrier, find_mtp


def skeleton(config, dtype: str | torch.dtype = "auto", path: Path | None = None) -> nn.Module:
    """The family's model with parameters on the meta device (no memory) and real buffers (RoPE inv_freq)."""
    with init_empty_weights():
        cls = compat.model_class(config)[1]
        return cls._from_config(config, dtype=checkpoint_dtype(config, dtype, path)).eval()


class ShardedCheckpoint:
    """A model directory whose weights are read on demand, one decoder layer at a time.

    `model` is the skeleton; `layers` its decoder layers (prefix `layer_prefix`, e.g. `model.layers.`).
    """

    def __init__(self, path: str | Path, *, dtype: str | torch.dtype = "auto", device: str = "cpu"):
        from moeprune.store.checkpoint import load_config

        self.path = Path(path)
        config = load_config(self.path)
        self.adapter = get_adapter(config)
        self.device = device
        self.weight_map = weight_map(self.path)
        missing_files = sorted({f for f in self.weight_map.values() if not (self.path / f).is_file()})
        if missing_files:
            raise MoepruneError(
                f"{self.path} lacks shard {missing_files[0]} named in its index; the download is incomplete"
            )
        self._check_shards_hold_their_tensors()
        self.model = skeleton(config, dtype, self.path)
        self.adapter = get_adapter(self.model.config)
        self.layers, self.layer_prefix = decoder_layers(self.model)
        self.conversion = compat.conversion_mapping(self.model)
        meta = self.model.state_dict()
        # on-disk key -> in-model name, e.g. model.layers.3.block_sparse_moe.experts.7.w1.weight ->
        # ...experts.gate_up_proj
        self.target = compat.in_model_names(self.model, self.weight_map, self.conversion, meta)
        # MTP layers have no place in the model (transformers drops them): kept aside for the writer
        self.mtp = find_mtp(self.target, meta, self.layer_prefix, len(self.layers))
        mtp_keys = self.mtp.keys
        self.target = {k: t for k, t in self.target.items() if k not in mtp_keys}
        # other tensors `from_pretrained` drops by the model class's own rule have no place in the model
        # either: not read, not carried, as in memory. transformers matches the rule against the renamed
        # key (Nemotron-3-Nano-Omni's `sound_encoder.encoder.feature_extractor.*` is dropped as
        # `audio_tower.feature_extractor.*`), so both names are tried
        ignored = compat.ignored_on_load(self.model)
        self.target = {k: t for k, t in self.target.items()
                       if t in meta or not any(re.search(p, k) or re.search(p, t) for p in ignored)}
        filled = compat.in_model_targets(self.model, list(self.target), self.conversion, meta)
        self._check_complete(meta, filled)
        sources = Counter(self.target.values())
        self._copied_by_loader = {
            t for t, n in sources.items() if n > 1
        }  # fused from several tensors: a new tensor

    def _check_shards_hold_their_tensors(self) -> None:
        """Every tensor the index names is in its shard (header reads only), so a damaged download fails
        now."""
        by_file: dict[str, set[str]] = {}
        for k, f in self.weight_map.items():
            by_file.setdefault(f, set()).add(k)
        for f, names in sorted(by_file.items()):
            try:
                with safe_open(str(self.path / f), framework="pt") as handle:
                    absent = sorted(names - set(handle.keys()))
            except Exception as e:  # noqa: BLE001  (safetensors raises its own error types)
                raise MoepruneError(f"{self.path}: shard {f} is damaged ({type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}); is the download complete?")
            if absent:
                raise MoepruneError(
                    f"{self.path}: shard {f} lacks {len(absent)} tensor(s) its index names (e.g. "
                    f"{absent[0]}); the download is incomplete or the index is wrong"
                )

    def _check_complete(self, meta: dict, targets: set[str]) -> None:
        """Every parameter of the skeleton must come from some on-disk tensor (tied ones appear once)."""
        # e.g. lm_head.weight -> embed_tokens.weight
        tied = getattr(self.model, "all_tied_weights_keys", None) or {}
        missing = [
            n for n, _ in self.model.named_parameters() if n not in targets and tied.get(n) not in targets
        ]
        if missing:
            raise MoepruneError(
                f"{self.path} has no weights for {len(missing)} parameters (e.g. {missing[0]}); the "
                "checkpoint is incomplete or does not match its config"
            )
        unknown = sorted(k for k, t in self.target.items() if t not in meta)
        if unknown:
            raise MoepruneError(
                f"{self.path} holds tensors the {type(self.model).__name__} model has no place for "
                f"({len(unknown)}, e.g. {unknown[0]}); the checkpoint does not match its config"
            )

    # ---- which keys ---------------------------------------------------------------------------
    def layer_keys(self, i: int) -> list[str]:
        """On-disk keys of decoder layer i."""
        prefix = f"{self.layer_prefix}{i}."
        return [k for k, t in self.target.items() if t.startswith(prefix)]

    def rest_keys(self) -> list[str]:
        """On-disk keys outside the decoder layers: embeddings, final norm, lm_head."""
        return [k for k, t in self.target.items() if not t.startswith(self.layer_prefix)]

    @property
    def num_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in set(self.weight_map.values()))

    # ---- loading and freeing -------------------------------------------------------------------
    def load(self, keys: list[str]) -> None:
        """Materialise the parameters behind on-disk `keys` in the skeleton (all sources of a fused tensor at
        once)."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        state = {}
        for name, ks in by_file.items():
            handle = safe_open(str(self.path / name), framework="pt")
            # lazy: read inside the loader, cast to the skeleton dtype
            state.update({k: handle.get_slice(k) for k in ks})
        with quiet_transformers():  # else the loader shows one progress bar per call, i.e. per layer
            info = compat.load_converted(self.model, state, self.conversion)
        bad = sorted(
            set(info.unexpected_keys) | {k[0] if isinstance(k, tuple) else k for k in info.mismatched_keys}
        )
        if bad or info.conversion_errors:
            detail = bad[0] if bad else next(iter(info.conversion_errors.values()))
            raise MoepruneError(
                f"{self.path}: could not load {detail} into the model; the checkpoint does not match "
                "its config"
            )

    def load_rest(self) -> None:
        self.load(self.rest_keys())
        # a tied lm_head is not on disk: share the embeddings, as from_pretrained does
        self.model.tie_weights()

    def load_layer(self, i: int) -> nn.Module:
        """Materialise decoder layer i, holding no view of the shard files (so their pages leave memory).

        Each fused tensor is loaded by its own call, so the shard pages of its sources are unmapped before
        the next one is read: the peak is one fused tensor's sources, not the whole layer's.
        """
        fused: dict[str, list[str]] = {}
        for k in self.layer_keys(i):
            fused.setdefault(self.target[k], []).append(k)
        for keys in fused.values():
            if len(keys) > 1:
                self.load(keys)
        self.load([k for keys in fused.values() if len(keys) == 1 for k in keys])
        layer = self.layers[i]
        prefix = f"{self.layer_prefix}{i}."
        for name, p in list(layer.named_parameters()):
            if prefix + name in self._copied_by_loader:
                continue
            # a renamed-only tensor is a zero-copy view of the mmap'd shard, which keeps every page of the
            # shard the loader touched (the per-expert sources too) resident until the view dies: copy it
            owner, _, leaf = name.rpartition(".")
            layer.get_submodule(owner)._parameters[leaf] = nn.Parameter(
                p.detach().clone(), requires_grad=False
            )
        from moeprune.store.checkpoint import refuse_nonfinite

        refuse_nonfinite(layer.named_parameters(prefix=prefix.rstrip(".")), self.path)
        if self.device != "cpu":
            layer.to(self.device)
        return layer

    def mtp_carrier(self) -> MtpCarrier | None:
        """The writer of this checkpoint's MTP layers (`store.mtp`), or None without any."""
        if not self.mtp:
            return None
        config, dtype = copy.deepcopy(self.model.config), next(self.model.parameters()).dtype
        return MtpCarrier(self.path, self.weight_map, self.mtp, self.model, lambda: skeleton(config, dtype))

    def raw_tensor(self, key: str) -> torch.Tensor:
        """One on-disk tensor as stored (no renaming, no cast)."""
        with safe_open(str(self.path / self.weight_map[key]), framework="pt") as f:
            return f.get_tensor(key)


def free(module: nn.Module) -> None:
    """Put a module's parameters and persistent buffers back on the meta device, releasing their memory."""
    for name, p in list(module.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        owner = module.get_submodule(owner_name)
        owner._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)
    for owner in module.modules():
        for leaf, b in list(owner._buffers.items()):
            if b is not None and leaf not in owner._non_persistent_buffers_set:
                owner._buffers[leaf] = b.to("meta")


def model_facts(model_path: str | Path) -> dict:
    """The fingerprint facts (`model_description`) of a checkpoint, from its config alone (model on meta)."""
    from moeprune.observe import model_description
    from moeprune.store.checkpoint import load_config

    config = load_config(model_path)
    get_adapter(config)
    model = skeleton(config)
    return model_description(model, get_adapter(model.config), str(model_path))
