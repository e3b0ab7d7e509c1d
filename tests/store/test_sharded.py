"""Sharded checkpoints read layer by layer: dtype from the shards, bad checkpoints refused up front."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import copy_checkpoint
from safetensors.torch import load_file

from moeprune.errors import MoepruneError
from moeprune.pipeline import ShardedCheckpoint
from moeprune.store.checkpoint import load_model


def test_bad_checkpoints_fail_before_the_pass(checkpoint, tmp_path):
    good = checkpoint("mixtral")
    missing_shard = copy_checkpoint(good, tmp_path / "missing")
    (missing_shard / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(MoepruneError, match="lacks shard"):
        ShardedCheckpoint(missing_shard)
    no_weights = copy_checkpoint(good, tmp_path / "bin")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(MoepruneError, match="no safetensors weights"):
        ShardedCheckpoint(no_weights)
    partial = copy_checkpoint(good, tmp_path / "partial")
    weights = load_file(partial / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v for k, v in weights.items() if ".layers.2." not in k}, partial / "model.safetensors")
    with pytest.raises(MoepruneError, match="no weights for"):
        ShardedCheckpoint(partial)


def test_dtype_comes_from_the_shards_when_the_config_has_none(tmp_path):
    from moeprune.arch.tiny import tiny_model

    tiny_model("mixtral").to(torch.bfloat16).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("dtype", None)
    cfg.pop("torch_dtype", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ck = ShardedCheckpoint(tmp_path)
    ck.load_layer(0)
    assert {p.dtype for p in ck.layers[0].parameters()} == {torch.bfloat16}
    assert next(load_model(tmp_path).parameters()).dtype == torch.bfloat16  # as from_pretrained(dtype="auto")
