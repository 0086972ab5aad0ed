"""Megatron's loader name for Llama 2/3 and Mistral: `--loader llama_mistral --checkpoint-type hf`
reads a HuggingFace folder (see loader_hf.py); --model-size is checked against its config.json."""

from __future__ import annotations

import loader_hf
from gigatron.core.convert.protocol import ConversionError

_SIZES = ("llama2-7B", "llama2-13B", "llama2-70B", "llama2-7Bf", "llama2-13Bf", "llama2-70Bf", "llama3",
          "llama3-8B", "llama3-70B", "llama3-8Bf", "llama3-70Bf", "mistral", "mistral-7B", "mistral-7Bf")


def add_arguments(parser) -> None:
    loader_hf.add_arguments(parser)
    group = parser.add_argument_group("Llama/Mistral loader")
    group.add_argument("--checkpoint-type", type=str, choices=["hf", "meta"], required=True,
                       help="Format of the checkpoint to load (hf: a HuggingFace folder).")
    group.add_argument("--model-size", type=str, choices=_SIZES, default=None,
                       help="Expected model family/size; checked against config.json.")


def load_checkpoint(args):
    if args.checkpoint_type != "hf":
        raise ValueError("--checkpoint-type meta is not supported: convert Meta's checkpoint to HuggingFace "
                         "format first (transformers' convert_llama_weights_to_hf.py) and use --checkpoint-type hf")
    for name, payload in loader_hf.load_checkpoint(args):
        if name == "metadata":
            _check_size(payload, args.model_size)
        yield name, payload


def _check_size(md: dict, model_size) -> None:
    family = md["hf_config"].get("model_type")
    if family not in ("llama", "mistral"):
        raise ConversionError(f"--loader llama_mistral reads Llama or Mistral models; config.json says {family!r}")
    if model_size is None:
        return
    expected = "mistral" if model_size.startswith("mistral") else "llama"
    if family != expected:
        raise ConversionError(f"--model-size {model_size} expects a {expected} model but config.json says {family}")
    sizes = {"7B": 32, "8B": 32, "13B": 40, "70B": 80}
    for tag, layers in sizes.items():
        if f"-{tag}" in model_size and md["num_layers"] != layers:
            raise ConversionError(f"--model-size {model_size} has {layers} layers but config.json says "
                                  f"{md['num_layers']}")
