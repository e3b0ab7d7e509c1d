"""The two weight sources the pipeline walks: a sharded checkpoint read layer by layer, or a model in memory.

Both give the walk the same things: the model (a weightless skeleton, or the real model), its adapter,
its decoder layers, a way to bring layer i into memory and to let it go, and the tensors outside the
decoder layers in their on-disk names. The walk (`pipeline.loop.walk`) does not know which one it has,
so the whole-model path is the layer-by-layer path with every layer already loaded.

A layer that the walk will change (`layer(i, changes=True)`) is the loaded layer itself for a
checkpoint (it is freed afterwards) and a copy for a model in memory, so the caller's model is never
modified and one model serves every point of a sweep.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from moeprune.arch import decoder_layers, get_adapter
from moeprune.runtime import check_fits, choose_in_memory
from moeprune.store.sharded import ShardedCheckpoint, free
from moeprune.store.writer import layer_on_disk

_UNSET = object()  # an MTP carrier not looked for yet (None: looked for, none found)


def _block_names(model: nn.Module, layers: nn.ModuleList, blocks: dict[int, nn.Module]) -> dict[int, str]:
    """Layer index -> the MoE block's name inside its decoder layer (e.g. `mlp`), to find it in a copy."""
    names = {}
    for i, block in blocks.items():
        names[i] = next(n for n, m in layers[i].named_modules() if m is block)
    return names


class CheckpointSource:
    """A checkpoint on disk, one decoder layer in memory at a time (`ShardedCheckpoint`)."""

    in_memory = False

    def __init__(self, path: str | Path, *, device: str = "cpu"):
        self.ck = ShardedCheckpoint(path, device=device)
        self.path = self.ck.path
        self.model = self.ck.model
        self.adapter = self.ck.adapter
        self.device = device
        self.layers, self.layer_prefix = self.ck.layers, self.ck.layer_prefix
        self.blocks = self.adapter.moe_blocks(self.model)
        self._block_names = _block_names(self.model, self.layers, self.blocks)
        self._pristine: dict[int, nn.Module] = {}
        self._mtp = _UNSET

    def prepare(self) -> None:
        """Load what every layer's call needs (embeddings, final norm, lm_head)."""
        self.ck.load_rest()

    def layer(self, i: int, *, changes: bool = False) -> tuple[nn.Module, nn.Module | None]:
        """(decoder layer i, its MoE block or None), read from the shards into the skeleton.

        A layer about to be changed leaves a weightless copy of itself behind (free: it is on the meta
        device), which `release` puts back, so the next walk over this source reads into the
        checkpoint's own shapes, not the pruned ones.
        """
        if changes and i in self.blocks:
            self._pristine[i] = copy.deepcopy(self.layers[i])
        layer = self.ck.load_layer(i)
        return layer, self.blocks.get(i)

    def release(self, i: int, layer: nn.Module) -> None:
        free(layer)
        pristine = self._pristine.pop(i, None)
        if pristine is not None:
            self.layers[i] = pristine
            self.blocks[i] = pristine.get_submodule(self._block_names[i])

    def layer_tensors(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        return layer_on_disk(self.model, layer, f"{self.layer_prefix}{i}.")

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """Embeddings, norm and lm_head as stored (a tied lm_head is not on disk, so it is not written)."""
        return {k: self.ck.raw_tensor(k) for k in self.ck.rest_keys()}

    def mtp_carrier(self):
        """The writer of the checkpoint's MTP layers (`store.mtp.MtpCarrier`), or None without any; made
        (and checked against the decoder, header reads only) on the first call."""
        if self._mtp is _UNSET:
            self._mtp = self.ck.mtp_carrier()
        return self._mtp


class ModelSource:
    """A model already in memory: every layer is loaded, nothing is freed, a changed layer is a copy."""

    in_memory = True

    def __init__(self, model: nn.Module, path: str | Path | None = None):
        self.model = model
        self.path = Path(path) if path is not None else None
        self.adapter = get_adapter(model.config)
        self.device = str(next(model.parameters()).device)
        self.layers, self.layer_prefix = decoder_layers(model)
        self.blocks = self.adapter.moe_blocks(model)
        self._block_names = _block_names(model, self.layers, self.blocks)
        self._mtp = _UNSET

    def prepare(self) -> None:
        pass

    def layer(self, i: int, *, changes: bool = False) -> tuple[nn.Module, nn.Module | None]:
        layer = self.layers[i]
        if not changes or i not in self.blocks:
            return layer, self.blocks.get(i)
        layer = copy.deepcopy(layer)
        return layer, layer.get_submodule(self._block_names[i])

    def release(self, i: int, layer: nn.Module) -> None:
        pass  # the model is the caller's; a changed copy goes with its last reference

    def layer_tensors(self, i: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        return layer_on_disk(self.model, layer, f"{self.layer_prefix}{i}.")

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """Everything outside the decoder layers in on-disk names; a tied weight is written once, as on
        disk."""
        from moeprune.compat import on_disk_names

        tied = set(getattr(self.model, "all_tied_weights_keys", None) or {})
        layer_prefix = self.layer_prefix
        state = {k: v for k, v in self.model.state_dict().items()
                 if not k.startswith(layer_prefix) and k not in tied}
        return on_disk_names(self.model, state)

    def mtp_carrier(self):
        """The writer of the MTP layers in the checkpoint at `path` (`store.mtp.MtpCarrier`), which the
        loaded model dropped, or None without any (or without a checkpoint to read them from); made on
        the first call."""
        from moeprune.store.mtp import carrier_for
        from moeprune.store.sharded import skeleton

        if self._mtp is not _UNSET:
            return self._mtp
        self._mtp = None
        if self.blocks:
            config = copy.deepcopy(self.model.config)
            first = next(iter(self.blocks.values()))
            dtype = next(iter(self.adapter.expert_parameters(first).values())).dtype
            self._mtp = carrier_for(self.path, self.model, lambda: skeleton(config, dtype))
        return self._mtp


def open_source(model_path: str | Path, runtime, *, model=None, device: str | None = None,
                needs_whole_model: str | None = None, copies: float = 1.0):
    """(weight source, why) for a run on `model_path`: layer by layer unless the whole model is needed.

    `model`, when the caller already holds it, is the source. `needs_whole_model` names what needs it
    (lm-eval tasks); then `copies` x the weights must fit in free memory (checked before loading).
    """
    device = device or runtime.device
    if model is not None:
        return ModelSource(model, model_path), "model given"
    in_memory, why = choose_in_memory(model_path, True if needs_whole_model else runtime.in_memory)
    if needs_whole_model:
        why = f"{needs_whole_model} need it"
    if not in_memory:
        return CheckpointSource(model_path, device=device), why
    check_fits(model_path, copies, needs_whole_model or "this run")
    from moeprune.store.checkpoint import load_model

    return ModelSource(load_model(model_path, device=device), model_path), why
