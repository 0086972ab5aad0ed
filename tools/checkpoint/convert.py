"""Convert checkpoints between HuggingFace and Gigatron/Megatron's `torch` layout, or re-shard a
`torch` checkpoint to another tensor/pipeline parallel size. Megatron's interface:

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver core \\
        --load-dir Llama-3-8B-hf --save-dir ckpt --target-tensor-parallel-size 2
    python tools/checkpoint/convert.py --model-type GPT --loader core --saver hf \\
        --load-dir ckpt --save-dir exported-hf

Loaders (loader_<name>.py): hf, llama_mistral (--checkpoint-type hf), mixtral_hf, core, torch, legacy.
Savers (saver_<name>.py): core, torch, hf, legacy, megatron_dist (Megatron-Core's own torch_dist),
megatron_torch (Megatron-LM's torch files, for its loader).
`--loader core` reads every layout the checkpoint registry reads: Gigatron's torch and torch_dist,
Megatron-LM's own torch files, Megatron-Core's torch_dist and the pre-Megatron-Core legacy names;
`--loader legacy` / `--saver legacy` read / write Megatron-LM's pre-Megatron-Core GPT layout
(`language_model.encoder.layers.N...`, e.g. the published 345M model):

    python tools/checkpoint/convert.py --model-type GPT --loader legacy --saver core \
        --load-dir megatron_345m --save-dir ckpt
A Mamba-2 or hybrid model (MambaModel: pretrain_mamba.py checkpoints, HuggingFace Mamba2ForCausalLM
NemotronHForCausalLM and BambaForCausalLM) converts with --model-type GPT through the same loaders and savers (hf, core,
and Megatron's own layouts: --loader core reads Megatron-Core's MambaModel torch_dist and Megatron-LM's torch
files, --saver megatron_dist / megatron_torch write them):

    python tools/checkpoint/convert.py --model-type GPT --loader hf --saver core \
        --load-dir mamba2-hf --save-dir ckpt --target-tensor-parallel-size 2
--model-type BERT (a HuggingFace BERT into BertModel with --bert-layernorm post) takes --loader hf and
--saver core or torch:

    python tools/checkpoint/convert.py --model-type BERT --loader hf --saver core \
        --load-dir bert-base-uncased --save-dir bert-ckpt --target-tensor-parallel-size 2

--model-type BERT or T5 between Megatron's own layouts (Megatron-Core's BertModel / T5Model:
torch_dist, Megatron-LM's torch files, the legacy BERT 345M layout) takes --loader core (any of
them) or legacy (BERT) and --saver megatron_dist, megatron_torch or legacy (BERT; see
gigatron/core/convert/encoder_models.py):

    python tools/checkpoint/convert.py --model-type BERT --loader legacy --saver megatron_dist \
        --load-dir megatron_bert_345m --save-dir bert-mcore
Each loader module has add_arguments(parser) and load_checkpoint(args) -> iterable of messages;
each saver module has add_arguments(parser) and save_checkpoint(messages, args). The loader runs in
a background thread feeding a queue of at most --max-queue-size messages (see
gigatron/core/convert/protocol.py for the messages). A user error (a bad flag, a missing or
corrupt checkpoint) is printed as one `error: ...` line with exit status 2 (gigatron/cli.py).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _HERE)
sys.path.insert(0, os.path.dirname(os.path.dirname(_HERE)))

from gigatron.cli import run_cli  # noqa: E402
from gigatron.core.convert.protocol import run_conversion  # noqa: E402


# The loaders and savers that handle --model-type BERT (the others are GPT-only): a HuggingFace BERT
# (post-LayerNorm) into Gigatron's layouts, or Megatron-Core's BERT / T5 between Megatron's layouts.
_BERT_LOADERS = ("hf",)
_BERT_SAVERS = ("core", "torch")
_MEGATRON_ENCODER_LOADERS = ("core", "legacy")
_MEGATRON_ENCODER_SAVERS = ("megatron_dist", "megatron_torch", "legacy")


def _plugin(kind: str, name: str):
    module_name = f"{kind}_{name}"
    if not os.path.isfile(os.path.join(_HERE, module_name + ".py")):
        available = sorted(f[len(kind) + 1:-3] for f in os.listdir(_HERE)
                           if f.startswith(kind + "_") and f.endswith(".py"))
        raise SystemExit(f"convert.py: unknown --{kind} {name!r}; available: {', '.join(available)}")
    return importlib.import_module(module_name)


def build_parser(argv) -> tuple[argparse.ArgumentParser, object, object]:
    parser = argparse.ArgumentParser(description="Gigatron checkpoint converter", allow_abbrev=False,
                                     conflict_handler="resolve")
    parser.add_argument("--model-type", type=str, required=True, choices=["GPT", "BERT", "T5"],
                        help="Type of the model.")
    parser.add_argument("--loader", type=str, default="core", help="Module name of the loader (loader_<name>.py).")
    parser.add_argument("--saver", type=str, default="core", help="Module name of the saver (saver_<name>.py).")
    parser.add_argument("--load-dir", type=str, required=True, help="Directory to load the model from.")
    parser.add_argument("--save-dir", type=str, required=True, help="Directory to save the model to.")
    parser.add_argument("--max-queue-size", type=int, default=50,
                        help="Maximum number of messages waiting between the loader and the saver.")
    parser.add_argument("--no-checking", action="store_false", dest="checking",
                        help="Do not check message order and drop tensors the saver does not use instead of failing.")
    known, _ = parser.parse_known_args(argv)
    loader = _plugin("loader", known.loader)
    saver = _plugin("saver", known.saver)
    loader.add_arguments(parser)
    saver.add_arguments(parser)
    return parser, loader, saver


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, loader, saver = build_parser(argv)
    args = parser.parse_args(argv)
    megatron_pair = args.loader in _MEGATRON_ENCODER_LOADERS and args.saver in _MEGATRON_ENCODER_SAVERS
    if args.model_type == "BERT" and not megatron_pair and (args.loader not in _BERT_LOADERS
                                                            or args.saver not in _BERT_SAVERS):
        parser.error(f"--model-type BERT is converted with --loader {' or '.join(_BERT_LOADERS)} (a HuggingFace BERT "
                     f"folder) and --saver {' or '.join(_BERT_SAVERS)}, or between Megatron's layouts with --loader "
                     f"{' or '.join(_MEGATRON_ENCODER_LOADERS)} and --saver {' or '.join(_MEGATRON_ENCODER_SAVERS)}; "
                     f"--loader {args.loader} --saver {args.saver} handle GPT models only")
    if args.model_type == "T5" and not (args.loader == "core" and args.saver in _MEGATRON_ENCODER_SAVERS[:2]):
        parser.error(f"--model-type T5 is converted between Megatron's layouts with --loader core and --saver "
                     f"megatron_dist or megatron_torch, not --loader {args.loader} --saver {args.saver}")
    if os.path.abspath(args.load_dir) == os.path.abspath(args.save_dir):
        parser.error("--save-dir must differ from --load-dir")
    run_conversion(loader.load_checkpoint(args), lambda messages: saver.save_checkpoint(messages, args),
                   args.max_queue_size)
    print(f"converted {args.load_dir} ({args.loader}) -> {args.save_dir} ({args.saver})", flush=True)


if __name__ == "__main__":
    sys.exit(run_cli(main))
