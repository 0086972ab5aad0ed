"""BERT pretraining: the model, batch, loss and dataset providers that `pretrain` runs.

Megatron's BERT flags that the generated parser lacks are added by `extra_args_provider`:
--bert-no-binary-head (DataConfig.bert_binary_head=False), --num-tokentypes (default: 2 with the
binary head, 0 without, as Megatron's pretrain_bert.py) and --bert-layernorm {pre,post} (pre:
Megatron's BERT; post: the original BERT layer, for checkpoints imported from HuggingFace).
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from typing import Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from gigatron.training.logging import print_rank_0

__all__ = ["extra_args_provider", "model_provider", "get_batch", "loss_func", "forward_step", "datasets_provider",
           "num_tokentypes", "main"]


def _add_once(group, parser, option: str, **kwargs) -> None:
    if option not in parser._option_string_actions:  # noqa: SLF001 - argparse keeps no public index
        group.add_argument(option, **kwargs)


def extra_args_provider(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """BERT flags: --bert-no-binary-head, --num-tokentypes, --bert-layernorm."""
    group = parser.add_argument_group("BERT")
    _add_once(group, parser, "--bert-no-binary-head", dest="bert_binary_head", action="store_false",
              help="Train without the sentence-order binary head (samples hold one segment).")
    _add_once(group, parser, "--num-tokentypes", type=int, default=None,
              help="Number of token-type (segment) embeddings. Default: 2 with the binary head, 0 without.")
    _add_once(group, parser, "--bert-layernorm", choices=["pre", "post"], default="pre",
              help="pre: Megatron's pre-LayerNorm BERT layer (default); post: the original BERT layer "
                   "(x = LN(x + sublayer(x)), LayerNorm after the embeddings), as in HuggingFace BERT.")
    return parser


def num_tokentypes(args) -> int:
    """--num-tokentypes, or its default from the binary head. `args` is a namespace or a dict of
    flag values (`Configs.extra` with `bert_binary_head` added)."""
    get = args.get if isinstance(args, dict) else lambda name, default=None: getattr(args, name, default)
    value = get("num_tokentypes", None)
    if value is None:
        return 2 if get("bert_binary_head", True) else 0
    if value < 0:
        raise ValueError(f"--num-tokentypes must be >= 0, got {value}")
    return value


def model_provider(ctx, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """One pipeline stage (model chunk) of the BERT model, initialized from --seed."""
    from gigatron.core.models.bert import BertModel

    extra, data = ctx.configs.extra, ctx.configs.data
    return BertModel(ctx.configs.transformer, ctx.groups, ctx.padded_vocab_size,
                     num_tokentypes=num_tokentypes({**extra, "bert_binary_head": data.bert_binary_head}),
                     add_binary_head=bool(data.bert_binary_head), layer_norm=extra.get("bert_layernorm", "pre"),
                     pre_process=pre_process, post_process=post_process, seed=data.seed, vp_stage=vp_stage)


def get_batch(data_iterator, model):
    """(tokens, types, sentence_order, loss_mask, lm_labels, padding_mask), all [b, s] but
    sentence_order [b], on the model's device. Every pipeline stage reads each micro-batch: all
    need the padding mask, the first the tokens, the last the labels."""
    inner = getattr(model, "module", model)
    batch = next(data_iterator)
    device = next(inner.parameters()).device
    tokens = batch["text"].to(device, non_blocking=True).long()  # [b, s]
    types = batch["types"].to(device, non_blocking=True).long()  # [b, s]
    sentence_order = batch["is_random"].to(device, non_blocking=True).long()  # [b]
    loss_mask = batch["loss_mask"].to(device, non_blocking=True).float()  # [b, s]
    lm_labels = batch["labels"].to(device, non_blocking=True).long()  # [b, s]
    padding_mask = batch["padding_mask"].to(device, non_blocking=True).long()  # [b, s]
    return tokens, types, sentence_order, loss_mask, lm_labels, padding_mask


def loss_func(loss_mask: torch.Tensor, sentence_order: torch.Tensor, output_tensor):
    """Masked-LM loss averaged over the masked tokens, plus the sentence-order loss averaged over
    the samples (with the binary head). Returns (loss, {"lm loss": [sum, tokens], "sop loss":
    [sum, samples]})."""
    lm_loss_per_token, sop_logits = output_tensor
    mask = loss_mask.reshape(-1).float()  # [b * s]
    lm_sum = torch.sum(lm_loss_per_token.float().reshape(-1) * mask)
    num_tokens = mask.sum()
    loss = lm_sum / num_tokens.clamp(min=1.0)
    report = {"lm loss": torch.stack([lm_sum.detach(), num_tokens.detach()])}
    if sop_logits is not None:
        labels = sentence_order.reshape(-1)  # [b]
        sop_sum = F.cross_entropy(sop_logits.reshape(-1, 2).float(), labels, ignore_index=-1, reduction="sum")
        count = (labels != -1).sum().float()
        loss = loss + sop_sum / count.clamp(min=1.0)
        report["sop loss"] = torch.stack([sop_sum.detach(), count.detach()])
    return loss, report


def forward_step(data_iterator, model):
    """The schedules' forward step: ((lm loss per token, binary logits), loss_func) on the last
    pipeline stage, (hidden states for the next stage, loss_func) on the others."""
    tokens, types, sentence_order, loss_mask, lm_labels, padding_mask = get_batch(data_iterator, model)
    inner = getattr(model, "module", model)
    tokentype_ids = types if inner.num_tokentypes > 0 else None
    output_tensor = model(tokens, padding_mask, tokentype_ids=tokentype_ids, lm_labels=lm_labels)
    return output_tensor, partial(loss_func, loss_mask, sentence_order)


def masked_datasets(ctx, train_valid_test_num_samples, kind: str):
    """BERT or T5 datasets of the run (rank 0 builds the index caches, the others wait and load)."""
    from gigatron.core.data import build_masked_datasets

    print_rank_0(f"> building {kind.upper()} datasets (train, valid, test samples: "
                 f"{tuple(train_valid_test_num_samples)})")
    barrier = dist.barrier if dist.is_available() and dist.is_initialized() else None
    return build_masked_datasets(ctx.configs.data, ctx.tokenizer, train_valid_test_num_samples, kind=kind,
                                 barrier=barrier, rank=ctx.run.rank)


def datasets_provider(ctx, train_valid_test_num_samples):
    """BERT datasets (sentence-level --data-path made with tools/preprocess_data.py --split-sentences)."""
    return masked_datasets(ctx, train_valid_test_num_samples, kind="bert")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """pretrain_bert.py: parse Megatron-style flags and train."""
    from gigatron.training.arguments import default_tokenizer_type, parse_args
    from gigatron.training.loop import pretrain_and_exit

    args = default_tokenizer_type(parse_args(argv, extra_args_provider=extra_args_provider), "BertWordPieceLowerCase")
    return pretrain_and_exit(datasets_provider, model_provider, forward_step, args)


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(main))
