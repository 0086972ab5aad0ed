"""Our BertModel / T5Model shaped like tests/megatron_bert_oracle.py's Megatron-Core models, and
their outputs on the oracle's inputs (shared by the BERT/T5 Megatron-layout tests)."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_bert_oracle as oracle  # noqa: E402


def our_config(**overrides):
    from gigatron.core.transformer.config import TransformerConfig

    values = dict(num_layers=2, hidden_size=oracle.HIDDEN, num_attention_heads=oracle.HEADS,
                  ffn_hidden_size=oracle.FFN, max_position_embeddings=2 * oracle.SEQ, attention_dropout=0.0,
                  hidden_dropout=0.0, transformer_impl="local", use_cpu_initialization=True,
                  params_dtype=torch.float32, add_bias_linear=True, norm_epsilon=1e-5)
    values.update(overrides)
    return TransformerConfig(**values)


def our_model(kind, seed=42):
    from gigatron.core.models.bert import BertModel
    from gigatron.core.models.t5 import T5Model
    from gigatron.core.parallel.groups import ParallelGroups

    if kind == "bert":
        model = BertModel(our_config(), ParallelGroups.single(), oracle.VOCAB, num_tokentypes=2, add_binary_head=True,
                          seed=seed)
    else:
        model = T5Model(our_config(), ParallelGroups.single(), oracle.VOCAB, seed=seed,
                        position_embedding_type="learned_absolute")
    with torch.no_grad():  # non-trivial norms and biases, as the oracle's model has
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return model.eval()


def our_outputs(kind, model, ref):
    """Our logits [b, s, V] (and BERT's binary logits) on the oracle's inputs."""
    with torch.no_grad():
        if kind == "bert":
            logits, binary = model(ref["tokens"], ref["padding"], ref["tokentypes"])
            return logits.transpose(0, 1), binary
        enc, dec = ref["encoder_tokens"], ref["decoder_tokens"]
        b, se, sd = enc.shape[0], enc.shape[1], dec.shape[1]
        causal = torch.triu(torch.ones(sd, sd, dtype=torch.bool), diagonal=1).expand(b, sd, sd)
        logits = model(enc, dec, torch.zeros(b, se, se, dtype=torch.bool), causal,
                       torch.zeros(b, sd, se, dtype=torch.bool))
        return logits.transpose(0, 1), None


def check_outputs(kind, ref, logits, binary):
    if kind == "bert":  # positions of real tokens (Megatron's padding query rows differ by design)
        real = ref["padding"].bool()
        torch.testing.assert_close(logits[real], ref["logits"][real], rtol=0, atol=1e-5)
        torch.testing.assert_close(binary, ref["binary_logits"], rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def pretrain_setup(kind, root, *extra):
    """What `pretrain_bert.py` / `pretrain_t5.py --load ROOT --use-checkpoint-args --no-load-optim`
    builds and loads before its first step (the model shape, tokenizer and iteration come from the
    checkpoint). Returns the TrainContext."""
    from gigatron.training import bert as bert_training
    from gigatron.training import t5 as t5_training
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import setup

    train = bert_training if kind == "bert" else t5_training
    argv = ["--load", str(root), "--use-checkpoint-args", "--no-load-optim", "--no-load-rng", "--micro-batch-size",
            "2", "--global-batch-size", "2", "--train-iters", "10", "--lr", "1e-4", "--distributed-backend", "gloo",
            "--attention-dropout", "0", "--hidden-dropout", "0", "--mock-data", *extra]
    return setup(train.model_provider, parse_args(argv, extra_args_provider=train.extra_args_provider))
