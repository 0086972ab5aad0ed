"""Gigatron: train transformer language models at any scale, compatible with Megatron-LM."""

__version__ = "0.1.0"
