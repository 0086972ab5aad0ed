"""T5 pretraining: the model, batch, loss and dataset providers that `pretrain` runs.

Sequence lengths follow Megatron: --encoder-seq-length (or --seq-length; they are the same flag for
T5) and --decoder-seq-length; --max-position-embeddings defaults to the longer of the two.
Layer counts likewise: --encoder-num-layers (or --num-layers) and --decoder-num-layers (default: as
many as the encoder); `extra_args_provider` adds these two flags. `--position-embedding-type
relative` selects T5's relative position bias (with Megatron's --relative-attention-num-buckets,
default 32, and --relative-attention-max-distance, default 128); TransformerConfig has no
"relative" type, so `resolve_args` records it as `args.t5_relative_attention` and leaves the
config without learned positions ("none"). `resolve_args(args)` fills all of this in before the run
starts.
"""

from __future__ import annotations

import sys
from functools import partial
from typing import Optional, Sequence

import torch

__all__ = ["extra_args_provider", "resolve_args", "resolve_num_layers", "resolve_sequence_lengths",
           "resolve_position_embedding", "model_provider", "get_batch", "loss_func", "forward_step",
           "datasets_provider", "main"]


def extra_args_provider(parser):
    """T5 flags: --encoder-num-layers, --decoder-num-layers."""
    group = parser.add_argument_group("T5")
    for option, text in (("--encoder-num-layers", "Number of encoder layers (the same as --num-layers for T5)."),
                         ("--decoder-num-layers", "Number of decoder layers. Default: the encoder's.")):
        if option not in parser._option_string_actions:  # noqa: SLF001 - argparse keeps no public index
            group.add_argument(option, type=int, default=None, help=text)
    for option, default, text in (
            ("--relative-attention-num-buckets", 32, "Buckets of the relative position bias "
                                                     "(--position-embedding-type relative)."),
            ("--relative-attention-max-distance", 128, "Longest distance the relative position buckets tell "
                                                       "apart (--position-embedding-type relative).")):
        if option not in parser._option_string_actions:  # noqa: SLF001
            group.add_argument(option, type=int, default=default, help=text)
    return parser


def resolve_position_embedding(args) -> None:
    """--position-embedding-type relative -> args.t5_relative_attention = True and the config type
    "none" (no learned positions); learned_absolute -> False."""
    kind = getattr(args, "position_embedding_type", "learned_absolute")
    if kind == "relative":
        args.position_embedding_type = "none"
        args.t5_relative_attention = True
    elif kind == "learned_absolute":
        args.t5_relative_attention = False
    elif not getattr(args, "t5_relative_attention", False):  # "none" from an earlier resolve keeps its choice
        raise ValueError(f"T5 supports --position-embedding-type learned_absolute or relative, not {kind}")


def resolve_num_layers(args) -> None:
    """num_layers = encoder_num_layers (one given, or both equal); decoder_num_layers defaults to it."""
    enc, num = getattr(args, "encoder_num_layers", None), getattr(args, "num_layers", None)
    if enc is not None and num is not None and enc != num:
        raise ValueError(f"--encoder-num-layers ({enc}) and --num-layers ({num}) disagree; for T5 they are the "
                         "encoder's layer count: give one of them")
    enc = enc if enc is not None else num
    if enc is None:
        raise ValueError("T5 needs --encoder-num-layers (or --num-layers)")
    args.encoder_num_layers = args.num_layers = enc
    if getattr(args, "decoder_num_layers", None) is None:
        args.decoder_num_layers = enc


def resolve_args(args) -> None:
    """Megatron's T5 argument rules: layer counts and sequence lengths."""
    resolve_num_layers(args)
    resolve_position_embedding(args)
    resolve_sequence_lengths(args)


def resolve_sequence_lengths(args) -> None:
    """seq_length = encoder_seq_length (one given, or both equal); decoder_seq_length required;
    max_position_embeddings >= both (default: the longer). Raises ValueError naming the flags."""
    enc, seq = getattr(args, "encoder_seq_length", None), getattr(args, "seq_length", None)
    if enc is not None and seq is not None and enc != seq:
        raise ValueError(f"--encoder-seq-length ({enc}) and --seq-length ({seq}) disagree; for T5 they are the "
                         "encoder length: give one of them")
    enc = enc if enc is not None else seq
    if enc is None:
        raise ValueError("T5 needs --encoder-seq-length (or --seq-length), e.g. 512")
    dec = getattr(args, "decoder_seq_length", None)
    if dec is None:
        raise ValueError("T5 needs --decoder-seq-length, e.g. 128")
    args.encoder_seq_length = args.seq_length = enc
    longest = max(enc, dec)
    max_pos = getattr(args, "max_position_embeddings", None)
    if max_pos is None:
        args.max_position_embeddings = longest
    elif max_pos < longest and not getattr(args, "t5_relative_attention", False):
        raise ValueError(f"--max-position-embeddings ({max_pos}) is shorter than the longest T5 sequence "
                         f"({longest}: --encoder-seq-length {enc}, --decoder-seq-length {dec}); raise it")


def model_provider(ctx, pre_process: bool = True, post_process: bool = True, vp_stage: Optional[int] = None):
    """The T5 model (one stage), initialized from --seed."""
    from gigatron.core.models.t5 import T5Model

    if vp_stage is not None:
        raise ValueError("T5 does not support virtual pipeline stages; drop --num-layers-per-virtual-pipeline-stage")
    extra = ctx.configs.extra  # the T5 flags of extra_args_provider, as resolve_args left them
    return T5Model(ctx.configs.transformer, ctx.groups, ctx.padded_vocab_size, pre_process=pre_process,
                   post_process=post_process, seed=ctx.configs.data.seed,
                   decoder_num_layers=extra.get("decoder_num_layers"),
                   position_embedding_type="relative" if extra.get("t5_relative_attention") else "learned_absolute",
                   relative_attention_num_buckets=extra.get("relative_attention_num_buckets", 32),
                   relative_attention_max_distance=extra.get("relative_attention_max_distance", 128))


def get_batch(data_iterator, model):
    """(tokens_enc [b, se], tokens_dec [b, sd], labels [b, sd], loss_mask [b, sd], enc_mask, dec_mask,
    enc_dec_mask) with the masks turned into the model's convention (True = masked)."""
    inner = getattr(model, "module", model)
    batch = next(data_iterator)
    device = next(inner.parameters()).device

    def get(key, dtype):
        return batch[key].to(device, non_blocking=True).to(dtype)

    tokens_enc = get("text_enc", torch.long)  # [b, se]
    tokens_dec = get("text_dec", torch.long)  # [b, sd]
    labels = get("labels", torch.long)  # [b, sd]
    loss_mask = get("loss_mask", torch.float)  # [b, sd]
    # The dataset marks the allowed pairs; the model takes the masked ones.
    enc_mask = ~get("enc_mask", torch.bool)  # [b, se, se]
    dec_mask = ~get("dec_mask", torch.bool)  # [b, sd, sd]
    enc_dec_mask = ~get("enc_dec_mask", torch.bool)  # [b, sd, se]
    return tokens_enc, tokens_dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor, per_token: bool = False):
    """Mean per-token loss over the decoder's real labels. Returns (loss, {"lm loss": [sum, tokens]});
    with `per_token` (--calculate-per-token-loss) (loss_sum, num_tokens, the same dict)."""
    mask = loss_mask.reshape(-1).float()  # [b * sd]
    loss_sum = torch.sum(output_tensor.float().reshape(-1) * mask)
    num_tokens = mask.sum()
    if per_token:
        return loss_sum, num_tokens, {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}
    return loss_sum / num_tokens.clamp(min=1.0), {"lm loss": torch.stack([loss_sum.detach(), num_tokens.detach()])}


def forward_step(data_iterator, model):
    """The schedules' forward step: (per-token loss [b, sd], loss_func)."""
    tokens_enc, tokens_dec, labels, loss_mask, enc_mask, dec_mask, enc_dec_mask = get_batch(data_iterator, model)
    output_tensor = model(tokens_enc, tokens_dec, enc_mask, dec_mask, enc_dec_mask, lm_labels=labels)
    from gigatron.core.pipeline.schedules import per_token_loss

    return output_tensor, partial(loss_func, loss_mask, per_token=per_token_loss([model]))


def datasets_provider(ctx, train_valid_test_num_samples):
    """T5 datasets (sentence-level --data-path; the tokenizer needs --vocab-extra-ids for sentinels)."""
    from gigatron.training.bert import masked_datasets

    return masked_datasets(ctx, train_valid_test_num_samples, kind="t5")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """pretrain_t5.py: parse Megatron-style flags, resolve the T5 lengths and train."""
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain_and_exit

    args = parse_args(argv, extra_args_provider=extra_args_provider)
    resolve_args(args)
    return pretrain_and_exit(datasets_provider, model_provider, forward_step, args)


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(main))
