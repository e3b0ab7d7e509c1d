"""Checkpoints on disk: reading configs, tokenizers and weights (whole or one layer at a time), and writing
pruned checkpoints with their model card."""
