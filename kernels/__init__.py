"""Fused masked cross-attention for the mirrored SGTR decoder (see kernels/masked_attention.py).

Stands alone: imports nothing else from the project, so the folder can be copied out as is.
"""
from .masked_attention import bernoulli_mask, masked_attention

__all__ = ["masked_attention", "bernoulli_mask"]
