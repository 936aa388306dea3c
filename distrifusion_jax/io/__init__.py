"""Checkpoints: diffusers/PyTorch key maps, weights reading, conversion, orbax save/restore."""
