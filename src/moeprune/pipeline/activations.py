"""Running decoder layers one at a time: what each layer is called with, and the hidden states between.

`layer_call` asks the model itself what decoder layer i receives for a batch: it runs the model's
forward with every layer up to i replaced by a recorder that passes its input through, and stops
at layer i. So the attention mask, position ids, rotary embeddings and any other keyword the family
passes (sliding-window masks differ per layer in GPT-OSS) come from transformers' own code, with
no kwarg names known here. Only the embeddings need to be loaded for that.

`HiddenStates` holds one tensor per calibration batch between layers, in memory up to a byte
budget and in files beyond it.

Shape letters: B batch, L sequence length, H hidden.
"""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from moeprune.arch import get_adapter
from moeprune.arch.base import text_generator


class _Reached(Exception):
    """Raised by the recorder at the wanted layer to stop the model's forward."""


@torch.no_grad()
def layer_call(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, i: int):
    """(h0 [B, L, H], args, kwargs): the embeddings and the call decoder layer i gets for `input_ids` [B,
    L]."""
    got: dict = {}
    passthrough = get_adapter(model.config).layer_passthrough

    def recorder(j):
        def forward(hidden_states, *args, **kwargs):
            if j == 0:
                got["h0"] = hidden_states
            if j == i:
                got["call"] = (args, kwargs)
                raise _Reached
            return passthrough(hidden_states, args, kwargs)  # so the model's own code reaches layer i

        return forward

    with _forwards_replaced(layers, {j: recorder(j) for j in range(i + 1)}):
        try:
            text_generator(model)(input_ids=input_ids, use_cache=False)
        except _Reached:
            pass
    if "call" not in got:
        raise RuntimeError(f"{type(model).__name__}'s forward never called decoder layer {i}")
    return got["h0"], *got["call"]


@torch.no_grad()
def head_logits(model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, last_hidden: torch.Tensor,
                state: torch.Tensor | None = None):
    """[B, L, V] the model's logits for `input_ids` [B, L] when its last decoder layer outputs `last_hidden`
    [B, L, H] and hands on `state` (what `run_layer` returned with it; read where the model's code after
    the layers reads one: the adapter's `head_state`).

    The model's own forward runs with every decoder layer passing its input through and the last one
    returning `last_hidden`, so the final norm, lm_head and any output processing are the family's own.
    """
    last = len(layers) - 1
    adapter = get_adapter(model.config)
    passthrough = adapter.layer_passthrough
    forwards = {
        j: (lambda h, *a, **k: passthrough(last_hidden, a, k)) if j == last
        else (lambda h, *a, **k: passthrough(h, a, k)) for j in range(last + 1)
    }
    with _forwards_replaced(layers, forwards), adapter.head_state(model, layers, state):
        return text_generator(model)(input_ids=input_ids, use_cache=False).logits


@contextmanager
def _forwards_replaced(layers: nn.ModuleList, forwards: dict):
    """Give layers[j] the instance forward forwards[j] (it shadows the class forward), then restore.

    A forward set on the instance before (accelerate's hooks do that) is put back, not deleted.
    """
    saved = {j: layers[j].__dict__.get("forward") for j in forwards}
    for j, fn in forwards.items():
        layers[j].forward = fn
    try:
        yield
    finally:
        for j, old in saved.items():
            if old is None:
                del layers[j].forward
            else:
                layers[j].forward = old


def to_device(obj, device):
    """Move the tensors inside nested tuples, lists and dicts to `device`; anything else is kept as is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def run_layer(adapter, layer: nn.Module, hidden: torch.Tensor, args: tuple,
              kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([B, L, H] output of one decoder layer, the state it hands the next layer besides, or None)."""
    out, state = adapter.split_layer_output(layer(hidden, *args, **kwargs))
    return out, adapter.carried_state(layer, hidden, args, kwargs, state)


class HiddenStates:
    """Hidden states per batch between two layers: in memory up to `budget` bytes (both layers' worth), then
    in files.

    `put(b, h)` stores the next layer's input of batch b; `advance()` makes those the current inputs.
    Files go to a temporary directory under `offload_dir` (default: the system's), removed on close.
    """

    def __init__(self, budget: int, offload_dir: str | Path | None = None):
        self.budget = budget
        self.offload_dir = offload_dir
        self._current: dict[int, torch.Tensor | Path] = {}
        self._next: dict[int, torch.Tensor | Path] = {}
        self._in_memory = 0  # bytes held in memory by both generations
        self._dir: Path | None = None
        self._generation = 0
        self.spilled_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def _directory(self) -> Path:
        if self._dir is None:
            base = Path(self.offload_dir) if self.offload_dir else None
            if base is not None:
                base.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="moeprune-hidden-", dir=base))
        return self._dir

    def put(self, b: int, hidden: torch.Tensor) -> None:
        size = hidden.numel() * hidden.element_size()
        if self._in_memory + size <= self.budget:
            self._next[b] = hidden.detach().cpu()
            self._in_memory += size
            return
        path = self._directory() / f"{self._generation + 1}-{b}.safetensors"
        save_file({"h": hidden.detach().cpu().contiguous()}, str(path))
        self._next[b] = path
        self.spilled_bytes += size

    def __contains__(self, b: int) -> bool:
        """Whether batch b has a current tensor."""
        return b in self._current

    def get(self, b: int) -> torch.Tensor:
        h = self._current[b]
        return load_file(str(h))["h"] if isinstance(h, Path) else h

    def advance(self) -> None:
        for h in self._current.values():
            if isinstance(h, Path):
                h.unlink(missing_ok=True)
            else:
                self._in_memory -= h.numel() * h.element_size()
        self._current, self._next = self._next, {}
        self._generation += 1

    def close(self) -> None:
        self._current.clear()
        self._next.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
