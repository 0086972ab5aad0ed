"""Megatron's loader name for Mixtral: `--loader mixtral_hf` reads a HuggingFace MixtralForCausalLM
folder (config.json + safetensors); the same as `--loader hf` on such a folder, but a folder of
another family is refused."""

from __future__ import annotations

import loader_hf
from gigatron.core.convert.protocol import ConversionError


def add_arguments(parser) -> None:
    loader_hf.add_arguments(parser)


def load_checkpoint(args):
    for name, payload in loader_hf.load_checkpoint(args):
        if name == "metadata":
            family = (payload.get("hf_config") or {}).get("model_type")
            if family != "mixtral":
                raise ConversionError(f"--loader mixtral_hf reads Mixtral models; {args.load_dir}/config.json says "
                                      f"model_type {family!r} (use --loader hf)")
        yield name, payload
