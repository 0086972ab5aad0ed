"""Shared pieces of the HuggingFace conversion tests: tiny random HF models saved with
save_pretrained and the conversion tool's entry point."""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
import convert  # noqa: E402

VOCAB = 100


def randomize(model, seed, scale=lambda name: 1.0):
    """Weights ~ N(0, 0.1) x scale(name); norms ~ 1 + N(0, 0.1); in sorted name order."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(1.0 + noise if "norm" in name or "ln_" in name else noise * scale(name))


def save_model(model, seed, path, scale=lambda name: 1.0):
    """Randomize (see randomize), switch to eval and save_pretrained into `path`."""
    randomize(model, seed, scale)
    model.eval()
    model.save_pretrained(path)
    return model


def make_hf_model(family, path, seed=0, **overrides):
    """A tiny random `family` model ("gpt2", "llama", "mistral") saved with save_pretrained;
    returns the model (eval, eager attention)."""
    import transformers

    if family == "gpt2":
        kw = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32, attn_implementation="eager")
        kw.update(overrides)
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kw))
    else:
        kw = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64,
                  attn_implementation="eager")
        kw.update(overrides)
        cls, cfg = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig)}[family]
        model = cls(cfg(**kw))
    return save_model(model, seed, path)


def load_safetensors_dir(path):
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def run_convert(*argv):
    convert.main(["--model-type", "GPT", *map(str, argv)])
