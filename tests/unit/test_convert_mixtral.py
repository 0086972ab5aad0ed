"""Mixtral (HuggingFace MixtralForCausalLM) import/export: HF -> `torch` checkpoint at any
tp/pp/ep -> HF is bitwise; from_pretrained on the HF folder and on the converted checkpoint gives
transformers' logits (fp32, eager attention); the router's top-k renormalisation matches ours."""

import json
import os

import pytest
import torch
import torch.distributed as dist

import gigatron
from gigatron.core.convert import ConversionError, collect_state, hf_messages, save_torch_checkpoint
from gigatron.core.convert.protocol import moe_config_from_metadata
from gigatron.core.convert.torch_format import read_torch_checkpoint, split_for_ep

from _hf_fixtures import VOCAB, load_safetensors_dir, run_convert, save_model  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

EXPERTS = 4


def make_mixtral(path, seed=0, **overrides):
    """A tiny random MixtralForCausalLM (2 layers, hidden 64, 4 experts, top-2, GQA) saved to `path`."""
    import transformers

    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_local_experts=EXPERTS, num_experts_per_tok=2, max_position_embeddings=64,
              rope_theta=5000.0, rms_norm_eps=1e-5, router_aux_loss_coef=0.02, attn_implementation="eager")
    kw.update(overrides)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**kw))
    # Larger router weights: clear top-k choices, so rounding never flips an expert.
    return save_model(model, seed, path,
                      scale=lambda name: 8.0 if name.endswith("gate.weight") and "experts" not in name else 1.0)


def _ids(batch=2, seq=12):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(3))


def test_metadata_and_router_flags(tmp_path):
    make_mixtral(tmp_path / "hf")
    md, tensors = collect_state(hf_messages(str(tmp_path / "hf")))
    assert (md["num_experts"], md["moe_router_topk"], md["moe_ffn_hidden_size"], md["moe_layer_freq"]) == (4, 2, 32, 1)
    assert md["moe_router_score_function"] == "softmax" and md["moe_router_pre_softmax"] is False
    assert md["moe_aux_loss_coeff"] == pytest.approx(0.02)
    assert (md["num_query_groups"], md["group_query_attention"], md["swiglu"]) == (2, True, True)
    moe = moe_config_from_metadata(md)
    assert moe.num_experts == 4 and moe.moe_router_topk == 2
    hf = load_safetensors_dir(tmp_path / "hf")
    # [w1; w3] = [gate; up] per expert, w2 -> linear_fc2, gate -> router.
    for j in range(EXPERTS):
        fc1 = tensors[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([hf[f"model.layers.1.block_sparse_moe.experts.{j}.w1.weight"],
                                           hf[f"model.layers.1.block_sparse_moe.experts.{j}.w3.weight"]]))
        assert torch.equal(tensors[f"decoder.layers.1.mlp.experts.local_experts.{j}.linear_fc2.weight"],
                           hf[f"model.layers.1.block_sparse_moe.experts.{j}.w2.weight"])
    assert torch.equal(tensors["decoder.layers.0.mlp.router.weight"], hf["model.layers.0.block_sparse_moe.gate.weight"])
    assert not any(".mlp.linear_fc1." in n for n in tensors)


def test_router_semantics_match_mixtral():
    """Mixtral: softmax over all experts, top-k, renormalise == our softmax router without
    --moe-router-pre-softmax (softmax over the top-k logits)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter

    from gigatron.core.transformer.moe.router import topk_routing

    cfg = MixtralConfig(hidden_size=16, num_local_experts=6, num_experts_per_tok=2)
    router = MixtralTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, generator=torch.Generator().manual_seed(0))
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    logits, weights, idx = router(x)
    probs, routing_map = topk_routing(logits, 2, "softmax", pre_softmax=False)
    expected = torch.zeros_like(probs).scatter_(1, idx, weights.to(probs.dtype))
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (1, 1, 2), (2, 2, 2), (1, 2, 4)])
def test_roundtrip_is_bitwise(tmp_path, tp, pp, ep):
    make_mixtral(tmp_path / "hf")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
                "--target-expert-parallel-size", ep)
    files = sorted(os.listdir(tmp_path / "ckpt" / "release"))
    expected = []
    for t in range(tp):
        for p in range(pp):
            name = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
            expected += [name] if ep == 1 else [f"{name}_{e:03d}" for e in range(ep)]
    assert files == sorted(expected + ["checksums.json"])
    # Each expert-parallel rank holds num_experts / ep experts, numbered locally.
    last = expected[-1]
    state = torch.load(tmp_path / "ckpt" / "release" / last / "model_optim_rng.pt", weights_only=True)
    local = sorted({n.split(".")[6] for n in state["model"] if ".local_experts." in n})
    assert local == [str(j) for j in range(EXPERTS // ep)]
    assert state["args"]["expert_model_parallel_size"] == ep and state["args"]["num_experts"] == EXPERTS
    fc1 = state["model"]["decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight"]
    assert tuple(fc1.shape) == (2 * 32 // tp, 64)

    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back")
    original = load_safetensors_dir(tmp_path / "hf")
    back = load_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    cfg_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    assert cfg_out["architectures"] == ["MixtralForCausalLM"]
    for key in ("model_type", "vocab_size", "num_local_experts", "num_experts_per_tok", "intermediate_size",
                "num_key_value_heads", "router_aux_loss_coef", "tie_word_embeddings", "rms_norm_eps"):
        assert cfg_out.get(key) == cfg_in.get(key), key


def test_mixtral_loader_alias(tmp_path):
    make_mixtral(tmp_path / "hf")
    run_convert("--loader", "mixtral_hf", "--saver", "core", "--load-dir", tmp_path / "hf",
                "--save-dir", tmp_path / "ckpt", "--target-expert-parallel-size", 2)
    md, _ = read_torch_checkpoint(str(tmp_path / "ckpt"))
    assert md["num_experts"] == EXPERTS and md["moe_router_topk"] == 2
    import transformers

    transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, sliding_window=None)).save_pretrained(tmp_path / "mistral")
    with pytest.raises(ConversionError, match="mixtral_hf reads Mixtral"):
        run_convert("--loader", "mixtral_hf", "--saver", "core", "--load-dir", tmp_path / "mistral",
                    "--save-dir", tmp_path / "ckpt2")


def test_bad_expert_parallel_size_fails_before_writing(tmp_path):
    make_mixtral(tmp_path / "hf")
    with pytest.raises(ValueError, match="must divide the number of experts"):
        run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir",
                    tmp_path / "ckpt", "--target-expert-parallel-size", 3)
    assert not (tmp_path / "ckpt").exists()
    from gigatron.core.convert import state_to_messages

    md, tensors = collect_state(hf_messages(str(tmp_path / "hf")))
    md["moe_ffn_hidden_size"] = 33  # experts narrower than the dense ffn size, which splits
    with pytest.raises(ValueError, match="ffn hidden size 33 does not split over --target-tensor-parallel-size 2"):
        save_torch_checkpoint(state_to_messages(md, tensors), str(tmp_path / "ckpt"), target_tp=2)
    assert not (tmp_path / "ckpt").exists()


def test_split_for_ep_renumbers_experts():
    state = {"decoder.layers.0.mlp.router.weight": torch.zeros(4, 2),
             **{f"decoder.layers.0.mlp.experts.local_experts.{j}.linear_fc2.weight": torch.full((2, 2), float(j))
                for j in range(4)}}
    parts = split_for_ep(state, 2, 4)
    assert sorted(parts[1]) == ["decoder.layers.0.mlp.experts.local_experts.0.linear_fc2.weight",
                                "decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight",
                                "decoder.layers.0.mlp.router.weight"]
    assert parts[1]["decoder.layers.0.mlp.experts.local_experts.1.linear_fc2.weight"][0, 0] == 3.0


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 1), (2, 1, 2)])
def test_from_pretrained_matches_transformers(tmp_path, tp, pp, ep):
    hf = make_mixtral(tmp_path / "hf")
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
    ours = gigatron.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        logits = ours(ids)
    assert logits.shape == ref.shape
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp,
                "--target-expert-parallel-size", ep)
    converted = gigatron.from_pretrained(tmp_path / "ckpt")
    with torch.no_grad():
        torch.testing.assert_close(converted(ids), ref, atol=1e-4, rtol=1e-4)


def test_direct_api_and_dense_export_refused(tmp_path):
    """save_torch_checkpoint(target_ep=...) directly; a Mixtral model cannot be exported as llama."""
    from gigatron.core.convert import save_hf_checkpoint, torch_checkpoint_messages

    make_mixtral(tmp_path / "hf", num_hidden_layers=1)
    save_torch_checkpoint(hf_messages(str(tmp_path / "hf")), str(tmp_path / "ckpt"), target_ep=4)
    assert sorted(os.listdir(tmp_path / "ckpt" / "release")) == ["checksums.json"] + [f"mp_rank_00_{e:03d}"
                                                                                        for e in range(4)]
    with pytest.raises(ConversionError, match="export them as mixtral"):
        save_hf_checkpoint(torch_checkpoint_messages(str(tmp_path / "ckpt")), str(tmp_path / "back"), family="llama")


def _engine_logits(rank, world_size, ckpt, ids, tp):
    """Load the converted checkpoint through the training engine (--use-checkpoint-args, --load)
    on this rank's tensor/expert-parallel shard and return the full logits [b, s, V] and the
    global numbers of the experts this rank holds."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.core.transformer.moe.config import MoEConfig
    from gigatron.training.arguments import build_config, parse_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint

    flags = ["--load", ckpt, "--use-checkpoint-args", "--num-layers", "1", "--hidden-size", "8",
             "--num-attention-heads", "2", "--micro-batch-size", "1", "--disable-bias-linear"]
    # The parallel layout is the run's (Megatron's --use-checkpoint-args does not take it from the checkpoint).
    layout = ["--tensor-model-parallel-size", str(tp), "--expert-model-parallel-size", str(world_size // tp)]
    args = parse_args(flags + layout + (["--sequence-parallel"] if tp > 1 else []))
    load_args_from_checkpoint(args)
    assert (args.num_experts, args.moe_router_topk) == (EXPERTS, 2)
    assert (args.tensor_model_parallel_size, args.expert_model_parallel_size) == (tp, world_size // tp)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp,
                                                 expert_model_parallel_size=args.expert_model_parallel_size))
    padded = vocab_size_with_padding(build_tokenizer(args).vocab_size, args.make_vocab_size_divisible_by, tp)
    config = build_config(TransformerConfig, args, attention_dropout=0.0, hidden_dropout=0.0,
                          perform_initialization=False, use_cpu_initialization=True)
    moe_config = build_config(MoEConfig, args)
    model = GPTModel(config, groups, padded, moe_config=moe_config)
    experts = model.decoder.layers[0].mlp.experts
    held = list(experts.local_expert_ids)
    load_checkpoint(ckpt, [model], None, None, groups)
    model.eval()
    with torch.no_grad():
        local = model(ids)  # [s, b, Vp/tp]
    if tp > 1:  # the vocab-parallel logits, gathered over the tensor-parallel group
        parts = [torch.empty_like(local) for _ in range(tp)]
        dist.all_gather(parts, local.contiguous(), group=groups.tp.group)
        local = torch.cat(parts, dim=-1)  # [s, b, Vp]
    return held, local.transpose(0, 1)[..., :VOCAB]  # [b, s, V]


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)])
def test_converted_checkpoint_loads_through_training_engine(tmp_path, tp, ep):
    """The shards the converter writes are the ones the training engine's ranks load: two gloo
    ranks (expert parallel, each holding two experts; or tensor parallel with sequence parallelism,
    experts split over the tensor-parallel ranks) give transformers' logits."""
    from tests.parallel.harness import run_distributed

    hf = make_mixtral(tmp_path / "hf")
    run_convert("--loader", "mixtral_hf", "--saver", "core", "--load-dir", tmp_path / "hf",
                "--save-dir", tmp_path / "ckpt", "--target-expert-parallel-size", ep,
                "--target-tensor-parallel-size", tp)
    ids = _ids(seq=10)
    with torch.no_grad():
        ref = hf(ids).logits
    results = run_distributed(_engine_logits, 2, str(tmp_path / "ckpt"), ids, tp)
    expected_held = [[0, 1], [2, 3]] if ep == 2 else [[0, 1, 2, 3]] * 2
    assert [held for held, _ in results] == expected_held
    for _, logits in results:
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


_ENGINE_FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "32", "--num-attention-heads", "4",
                 "--group-query-attention", "--num-query-groups", "2", "--seq-length", "16",
                 "--max-position-embeddings", "64", "--position-embedding-type", "rope", "--normalization", "RMSNorm",
                 "--swiglu", "--disable-bias-linear", "--untie-embeddings-and-output-weights", "--num-experts",
                 str(EXPERTS), "--moe-router-topk", "2", "--micro-batch-size", "1", "--tokenizer-type",
                 "NullTokenizer", "--vocab-size", str(VOCAB - 1), "--make-vocab-size-divisible-by", "16"]


def _train_engine_save(rank, world_size, save_dir, ids):
    """A randomly initialised MoE GPT at expert-parallel size `world_size`, saved by the training
    engine; returns its logits [b, s, V]."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import vocab_size_with_padding
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.core.transformer.moe.config import MoEConfig
    from gigatron.training.arguments import build_config, parse_args
    from gigatron.training.checkpointing import save_checkpoint

    args = parse_args(_ENGINE_FLAGS + ["--expert-model-parallel-size", str(world_size)])
    groups = ParallelGroups.build(ParallelConfig(expert_model_parallel_size=world_size))
    padded = vocab_size_with_padding(VOCAB, 16, 1)
    config = build_config(TransformerConfig, args, attention_dropout=0.0, hidden_dropout=0.0,
                          use_cpu_initialization=True)
    model = GPTModel(config, groups, padded, moe_config=build_config(MoEConfig, args))
    with torch.no_grad():  # norms away from 1, so a swapped norm would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
        model.eval()
        logits = model(ids).transpose(0, 1)[..., :VOCAB]  # [b, s, V]
    save_checkpoint(save_dir, 5, [model], None, None, args, groups, save_optim=False, save_rng=False)
    return logits


def test_training_engine_moe_checkpoint_exports_to_transformers(tmp_path):
    """An expert-parallel checkpoint written by the training engine -> HuggingFace Mixtral folder:
    transformers' MixtralForCausalLM gives the engine's logits."""
    import transformers

    from tests.parallel.harness import run_distributed

    ids = _ids(seq=10)
    results = run_distributed(_train_engine_save, 2, str(tmp_path / "ckpt"), ids)
    assert sorted(os.listdir(tmp_path / "ckpt" / "iter_0000005")) == ["checksums.json", "mp_rank_00_000", "mp_rank_00_001"]
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["model_type"], cfg["num_local_experts"], cfg["num_experts_per_tok"]) == ("mixtral", EXPERTS, 2)
    hf = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(results[0], results[1])
    torch.testing.assert_close(ref, results[0], atol=1e-4, rtol=1e-4)
