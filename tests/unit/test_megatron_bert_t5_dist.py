"""BERT and T5 in Megatron-Core's own torch_dist layout, both directions, with megatron-core itself
as the oracle (tests/megatron_bert_oracle.py, in subprocesses): Megatron-Core's BertModel /
T5Model saved by its dist_checkpointing at tensor-parallel size 1 and 2 load into our BertModel /
T5Model (training's load_checkpoint) with Megatron-Core's own logits (1e-5, fp32); and our models
written by write_megatron_dist load strictly into Megatron-Core's models at tp 1 and 2 with the
logits we compute."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_bert_oracle as oracle  # noqa: E402
import megatron_oracle  # noqa: E402

from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import CheckpointError  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed")


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


# ------------------------------------------------------------------ Megatron-Core -> Gigatron


@pytest.fixture(scope="module", params=[("bert", 1), ("bert", 2), ("t5", 1), ("t5", 2)],
                ids=lambda p: f"{p[0]}-tp{p[1]}")
def megatron_ckpt(request, tmp_path_factory):
    kind, tp = request.param
    root = tmp_path_factory.mktemp(f"mcore_{kind}_{tp}")
    oracle.run_oracle("write-dist", "--kind", kind, "--root", str(root), "--tp", str(tp), processes=tp,
                      port=free_port())
    oracle.run_oracle("logits", "--kind", kind, "--root", str(root), port=free_port())
    return root, kind


def test_megatron_bert_t5_torch_dist_loads_with_megatron_logits(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, kind = megatron_ckpt
    iter_dir, iteration, module = formats.locate(str(root))
    assert module.NAME == "megatron_torch_dist" and iteration == 5
    ref = torch.load(root / "reference.pt", weights_only=True)
    model = our_model(kind)
    loaded = load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert loaded.iteration == 5
    check_outputs(kind, ref, *our_outputs(kind, model, ref))


def test_read_model_gives_our_names(megatron_ckpt):
    root, kind = megatron_ckpt
    state = formats.read_model(str(root))
    ours = {k for k, v in our_model(kind).state_dict().items() if isinstance(v, torch.Tensor)}
    assert set(state.tensors) == ours  # T5's aliased copies are dropped, stacked layers split


def test_a_bert_checkpoint_does_not_fit_a_t5_model(megatron_ckpt):
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, kind = megatron_ckpt
    other = our_model("t5" if kind == "bert" else "bert")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(str(root), [other], None, None, ParallelGroups.single(), load_optim=False)


# ------------------------------------------------------------------ Gigatron -> Megatron-Core


def write_ours(kind, root):
    """Our model's weights as Megatron-Core's torch_dist (convert.py --saver megatron_dist's writer)."""
    from gigatron.core.checkpoint.megatron_dist import write_megatron_dist

    model = our_model(kind, seed=7)
    tensors = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    args = dict(num_layers=2, hidden_size=oracle.HIDDEN, num_attention_heads=oracle.HEADS, ffn_hidden_size=oracle.FFN,
                padded_vocab_size=oracle.VOCAB, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                untie_embeddings_and_output_weights=False)
    if kind == "t5":
        args.update(encoder_num_layers=2, decoder_num_layers=2)
    write_megatron_dist(str(root), tensors, args, 5)
    return model


@pytest.mark.parametrize("kind,tp", [("bert", 1), ("bert", 2), ("t5", 1), ("t5", 2)])
def test_megatron_core_loads_our_bert_t5_strictly(tmp_path, kind, tp):
    model = write_ours(kind, tmp_path)
    oracle.run_oracle("logits", "--kind", kind, "--root", str(tmp_path), "--tp", str(tp), processes=tp,
                      port=free_port())
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    check_outputs(kind, ref, *our_outputs(kind, model, ref))
