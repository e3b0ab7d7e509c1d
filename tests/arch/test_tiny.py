import torch

from moeprune.arch import get_adapter
from moeprune.arch.tiny import tiny_model


def test_every_tiny_family_has_moe_blocks():
    for family in ("mixtral", "deepseek_v3"):
        model = tiny_model(family)
        adapter = get_adapter(model.config)
        assert adapter.moe_blocks(model)
        assert adapter.num_experts == 8
        out = model(torch.randint(0, 1024, (1, 8))).logits
        assert out.shape == (1, 8, 1024)
