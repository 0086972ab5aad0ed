"""Transformer building blocks: config, norms, rotary embeddings, attention, MLP, layers, blocks."""

from .config import TransformerConfig

__all__ = ["TransformerConfig"]
