"""Multi-latent attention and multi-token prediction on one CPU process: Megatron-Core's parameter
names, agreement with upstream Megatron-Core (logits, per-token loss, gradients, MTP losses), YaRN
frequencies and scales, the loss function's MTP terms, and the flags."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64

MLA = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, seq_length=16,
           attention_dropout=0.0, hidden_dropout=0.0, multi_latent_attention=True, q_lora_rank=12, kv_lora_rank=8,
           qk_head_dim=6, qk_pos_emb_head_dim=4, v_head_dim=5, qk_layernorm=True, normalization="RMSNorm",
           position_embedding_type="rope", swiglu=True, add_bias_linear=False, rotary_scaling_factor=40.0,
           mscale=1.0, mscale_all_dim=0.7, untie_embeddings_and_output_weights=True, init_method_std=0.05)


def mla_config(**kw) -> TransformerConfig:
    return TransformerConfig(**{**MLA, **kw})


def build(config, seed=3) -> GPTModel:
    model = GPTModel(config, ParallelGroups.single(), VOCAB, seed=seed)
    with torch.no_grad():  # norms away from 1 so that a misplaced norm shows
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
    return model


def batch(b=2, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (b, s + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def test_parameter_names_are_megatron_cores():
    names = dict(build(mla_config()).named_parameters())
    prefix = "decoder.layers.1.self_attention."
    shapes = {"linear_q_down_proj.weight": (12, 32), "q_layernorm.weight": (12,),
              "linear_q_up_proj.weight": (4 * 10, 12), "linear_kv_down_proj.weight": (8 + 4, 32),
              "kv_layernorm.weight": (8,), "linear_kv_up_proj.weight": (4 * (6 + 5), 8),
              "linear_proj.weight": (32, 4 * 5)}
    for suffix, shape in shapes.items():
        assert tuple(names[prefix + suffix].shape) == shape, suffix
    assert not any("linear_qkv" in n for n in names)
    # Without --q-lora-rank the query is one full-rank projection; without --qk-layernorm no latent norms.
    plain = dict(build(mla_config(q_lora_rank=None, qk_layernorm=False)).named_parameters())
    assert tuple(plain[prefix + "linear_q_proj.weight"].shape) == (40, 32)
    assert not any("q_down" in n or "q_up" in n or "layernorm" in n and "self_attention" in n for n in plain)


def test_mtp_parameter_names_are_megatron_cores():
    names = {n for n, _ in build(mla_config(mtp_num_layers=2)).named_parameters()}
    for k in (0, 1):
        for suffix in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "final_layernorm.weight",
                       "transformer_layer.input_layernorm.weight",
                       "transformer_layer.self_attention.linear_kv_down_proj.weight",
                       "transformer_layer.mlp.linear_fc1.weight"):
            assert f"mtp.layers.{k}.{suffix}" in names


def test_yarn_frequencies_and_scales_follow_the_formulas():
    from gigatron.core.transformer.mla import mla_rope_mscale, mla_softmax_scale, yarn_inv_freq

    dim, base, factor = 64, 10000.0, 40.0
    freq = yarn_inv_freq(dim, base, factor)
    plain = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    # Channel pairs below the beta_fast bound keep their frequency, those above beta_slow's are divided.
    low = math.floor(dim * math.log(4096 / (32 * 2 * math.pi)) / (2 * math.log(base)))
    high = math.ceil(dim * math.log(4096 / (1 * 2 * math.pi)) / (2 * math.log(base)))
    torch.testing.assert_close(freq[:low + 1], plain[:low + 1])
    torch.testing.assert_close(freq[high:], plain[high:] / factor)
    assert torch.all((freq[low:high + 1] <= plain[low:high + 1]) & (freq[low:high + 1] >= plain[low:high + 1] / factor))
    cfg = mla_config(rotary_scaling_factor=factor, mscale=0.9, mscale_all_dim=0.7)
    m_all = 0.1 * 0.7 * math.log(factor) + 1
    assert mla_softmax_scale(cfg) == pytest.approx(m_all ** 2 / math.sqrt(6 + 4))
    assert mla_rope_mscale(cfg) == pytest.approx((0.1 * 0.9 * math.log(factor) + 1) / m_all)
    # A factor of 1 changes nothing; --rope-type rope keeps the plain frequencies.
    assert mla_softmax_scale(mla_config(rotary_scaling_factor=1.0)) == pytest.approx(1 / math.sqrt(10))
    torch.testing.assert_close(yarn_inv_freq(dim, base, 1.0), plain)
    assert mla_rope_mscale(mla_config(rope_type="rope")) == 1.0


def test_rotary_part_is_rotated_in_channel_pairs():
    from gigatron.core.transformer.mla import apply_mla_rotary_pos_emb

    t = torch.randn(3, 1, 2, 4)  # [s, b, n, dr]
    angles = torch.tensor([0.3, 1.1])  # one per channel pair
    positions = torch.arange(3, dtype=torch.float32)
    freqs = (positions[:, None] * angles).repeat(1, 2)[:, None, None, :]  # [s, 1, 1, dr]
    out = apply_mla_rotary_pos_emb(t, freqs, mscale=1.5)
    for pair in range(2):
        x, y = t[..., 2 * pair], t[..., 2 * pair + 1]
        a = positions[:, None, None] * angles[pair]
        # Output layout: rotated even channels, then rotated odd channels.
        torch.testing.assert_close(out[..., pair], 1.5 * (x * torch.cos(a) - y * torch.sin(a)))
        torch.testing.assert_close(out[..., 2 + pair], 1.5 * (y * torch.cos(a) + x * torch.sin(a)))


def test_mla_is_causal_and_learns():
    torch.manual_seed(0)
    model = build(mla_config())
    ids, labels = batch()
    logits = model(ids)
    changed = ids.clone()
    changed[:, 10] = (changed[:, 10] + 1) % VOCAB
    torch.testing.assert_close(model(changed)[:10], logits[:10])  # earlier positions do not see later tokens
    assert not torch.allclose(model(changed)[10:], logits[10:])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(ids, labels=labels).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_mtp_losses_enter_the_loss_with_shifted_masks():
    from gigatron.training.gpt import loss_func

    model = build(mla_config(mtp_num_layers=2, mtp_loss_scaling_factor=0.3))
    model.train()
    ids, labels = batch()
    main = model(ids, labels=labels)
    mtp = model.pop_mtp_losses()
    assert mtp.shape == (2, 2, 16) and model.pop_mtp_losses() is None  # handed over once
    mask = torch.ones(2, 16)
    mask[0, 3] = 0.0
    loss, logged = loss_func(mask, main, mtp_losses=mtp, mtp_loss_scaling_factor=0.3)
    means = []
    for k in (1, 2):
        mask_k = torch.zeros_like(mask)
        mask_k[:, :16 - k] = mask[:, k:]
        assert torch.equal(logged[f"mtp_{k} loss"], torch.stack([(mtp[k - 1] * mask_k).sum(), mask_k.sum()]))
        means.append((mtp[k - 1] * mask_k).sum() / mask_k.sum())
    main_mean = (main * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, main_mean + 0.3 / 2 * (means[0] + means[1]))
    torch.testing.assert_close(logged["lm loss"], torch.stack([(main * mask).sum(), mask.sum()]))
    # Block k predicts labels shifted by k: its loss at position t is the cross entropy of labels[t + k].
    per_token, _ = loss_func(mask, main, per_token=True, mtp_losses=mtp, mtp_loss_scaling_factor=0.3)[::2]
    assert per_token.ndim == 0
    # Evaluation computes no MTP losses.
    model.eval()
    model(ids, labels=labels)
    assert model.pop_mtp_losses() is None


def test_bad_mla_and_mtp_flags_name_the_fix():
    with pytest.raises(ValueError, match="add --multi-latent-attention"):
        TransformerConfig(**{**MLA, "multi_latent_attention": False})
    with pytest.raises(ValueError, match="--qk-pos-emb-head-dim .* must be even"):
        mla_config(qk_pos_emb_head_dim=3)
    with pytest.raises(ValueError, match="--rotary-interleaved"):
        mla_config(rotary_interleaved=True)
    with pytest.raises(ValueError, match="--mtp-num-layers must be >= 1"):
        mla_config(mtp_num_layers=0)
    with pytest.raises(ValueError, match="needs --untie-embeddings-and-output-weights"):
        mla_config(mtp_num_layers=1, pipeline_model_parallel_size=2, untie_embeddings_and_output_weights=False)
    with pytest.raises(ValueError, match="needs rotary or no position embeddings"):
        mla_config(mtp_num_layers=1, pipeline_model_parallel_size=2, position_embedding_type="learned_absolute")
    with pytest.raises(ValueError, match="--rope-type 'ntk' is not one of"):
        mla_config(rope_type="ntk")
    assert mla_config().rope_type == "yarn"  # Megatron's default with MLA


def test_flags_reach_the_config_and_help():
    from gigatron.training import arguments as A
    from gigatron.training.validate import validate_args

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
            "--max-position-embeddings", "16", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "64", "--multi-latent-attention", "--q-lora-rank", "12",
            "--kv-lora-rank", "8", "--qk-head-dim", "6", "--qk-pos-emb-head-dim", "4", "--v-head-dim", "5",
            "--rotary-scaling-factor", "40", "--mscale", "0.9", "--mscale-all-dim", "0.7", "--rope-type", "yarn",
            "--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "0.2"]
    t = A.configs_from_args(validate_args(A.parse_args(argv), 1)).transformer
    assert (t.multi_latent_attention, t.q_lora_rank, t.kv_lora_rank, t.qk_head_dim, t.qk_pos_emb_head_dim,
            t.v_head_dim, t.rotary_scaling_factor, t.mscale, t.mscale_all_dim, t.rope_type, t.mtp_num_layers,
            t.mtp_loss_scaling_factor) == (True, 12, 8, 6, 4, 5, 40.0, 0.9, 0.7, "yarn", 1, 0.2)
    text = A.build_parser().format_help()
    for flag in ("--multi-latent-attention", "--q-lora-rank", "--kv-lora-rank", "--qk-head-dim",
                 "--qk-pos-emb-head-dim", "--v-head-dim", "--rope-type", "--rotary-scaling-factor", "--mscale",
                 "--mscale-all-dim", "--mtp-num-layers", "--mtp-loss-scaling-factor"):
        assert flag in text, flag
    assert "low-rank latents" in text and "multi-token prediction" in text.lower()


def _megatron_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("megatron") is not None and importlib.util.find_spec("megatron.core") is not None


@pytest.mark.skipif(not _megatron_available(), reason="megatron-core is not installed")
@pytest.mark.parametrize("mtp", [None, 2])
def test_matches_megatron_core(tmp_path, mtp):
    from gigatron.training.gpt import loss_func
    from tests.parallel.harness import free_port

    config = mla_config(mtp_num_layers=mtp, mtp_loss_scaling_factor=0.25)
    model = build(config)
    ids, labels = batch(seed=5)
    spec = {k: getattr(config, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                                           "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                                           "v_head_dim", "rope_type", "rotary_base", "rotary_scaling_factor",
                                           "mscale", "mscale_all_dim", "seq_length", "mtp_num_layers",
                                           "mtp_loss_scaling_factor")}
    spec["vocab_size"] = VOCAB
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    torch.save({"state_dict": model.state_dict(), "tokens": ids, "labels": labels}, tmp_path / "state.pt")
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "megatron_mla_oracle.py"), "--spec",
                             str(tmp_path / "spec.json"), "--state", str(tmp_path / "state.pt"), "--out",
                             str(tmp_path / "out.pt"), "--port", str(free_port())],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    ref = torch.load(tmp_path / "out.pt", weights_only=True)

    if not mtp:
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).transpose(0, 1), ref["logits"], rtol=1e-4, atol=1e-5)
    model.train()
    main = model(ids, labels=labels)
    torch.testing.assert_close(main.detach(), ref["loss"], rtol=1e-4, atol=1e-5)
    loss, logged = loss_func(torch.ones_like(main), main, mtp_losses=model.pop_mtp_losses(),
                             mtp_loss_scaling_factor=config.mtp_loss_scaling_factor or 0.1)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert set(grads) == set(ref["grads"])
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    if mtp:
        ours = torch.stack([logged[f"mtp_{k} loss"][0] / logged[f"mtp_{k} loss"][1] for k in (1, 2)])
        torch.testing.assert_close(ours, ref["mtp"].float(), rtol=1e-4, atol=1e-5)


def test_memory_estimate_counts_mla_and_mtp_parameters():
    from gigatron.core import memory

    for kw in (dict(mtp_num_layers=2), dict(q_lora_rank=None, qk_layernorm=False, normalization="LayerNorm")):
        config = mla_config(**kw)
        model = build(config)
        counted = memory.stage_parameter_numels(config, VOCAB)
        assert [n for n, _ in counted] == [p.numel() for p in model.parameters()], kw  # registration order
    with pytest.raises(ValueError, match="does not model its activations"):
        memory.layer_activation_bytes(mla_config(), 2, 16)


def test_flops_count_the_latent_projections_and_mtp_blocks():
    """Megatron's MLA count equals the multiply-adds of the modules as built: every attention weight
    once per token (plus one per latent channel for the norms), core attention over dq and dv
    channels at half the s x s matrix; each MTP block adds a layer, eh_proj, three norms and logits."""
    from gigatron.core.flops import num_floating_point_operations

    b, s = 2, 16
    for kw in (dict(), dict(q_lora_rank=None)):
        config = mla_config(**kw)
        model = build(config)
        attention = model.decoder.layers[0].self_attention
        weights = sum(m.weight.numel() for m in attention.modules() if hasattr(m, "weight") and m.weight is not None
                      and m.weight.dim() == 2)
        norms = (config.q_lora_rank or 0) + config.kv_lora_rank
        core = s * 4 * (10 + 5) / 2
        mlp = sum(m.weight.numel() for m in model.decoder.layers[0].mlp.modules()
                  if hasattr(m, "weight") and m.weight is not None and m.weight.dim() == 2)
        logits = 32 * VOCAB
        expected = 6 * b * s * (2 * (weights + norms + core + mlp) + logits)
        assert num_floating_point_operations(config, VOCAB, b, s) == pytest.approx(expected)
        with_mtp = mla_config(mtp_num_layers=2, **kw)
        block = weights + norms + core + mlp + 2 * 32 * 32 + 3 * 32 + logits
        assert num_floating_point_operations(with_mtp, VOCAB, b, s) == pytest.approx(expected + 6 * b * s * 2 * block)


def test_mla_up_proj_recompute_keeps_less_and_changes_nothing():
    def run(**kw):
        model = build(mla_config(**kw))
        model.train()
        ids, labels = batch()
        saved = {}

        def pack(t):
            saved.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
            return t

        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(ids, labels=labels).mean()
        loss.backward()
        kept = sum(n for ptr, n in saved.items() if ptr not in params)
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept

    loss, grads, kept = run()
    loss_r, grads_r, kept_r = run(recompute_granularity="selective", recompute_modules=["mla_up_proj"])
    torch.testing.assert_close(loss_r, loss, rtol=0, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    assert kept_r < kept
    with pytest.raises(ValueError, match="mla_up_proj needs --multi-latent-attention"):
        TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16,
                          recompute_granularity="selective", recompute_modules=["mla_up_proj"])


def test_mla_mtp_checkpoint_converts_to_tp2_and_pp2_and_trains_on(tmp_path):
    """A `torch` checkpoint of a trained MLA + MTP model, converted by tools/checkpoint/convert.py to
    tp=2 and to pp=2 (the last stage with the blocks and their embedding copy), holds the same
    tensors and continues training with the same losses as the tp=1 conversion."""
    import os
    import re as regex

    from gigatron.core.checkpoint import torch_layout
    from tests.parallel.harness import free_port

    flags = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 --max-position-embeddings 16 "
             "--micro-batch-size 2 --global-batch-size 4 --lr 1e-3 --mock-data --vocab-size 64 "
             "--tokenizer-type NullTokenizer --multi-latent-attention --q-lora-rank 12 --kv-lora-rank 8 "
             "--qk-head-dim 6 --qk-pos-emb-head-dim 4 --v-head-dim 5 --qk-layernorm --normalization RMSNorm "
             "--position-embedding-type rope --swiglu --disable-bias-linear --untie-embeddings-and-output-weights "
             "--mtp-num-layers 1 --rotary-scaling-factor 40 --mscale-all-dim 1.0 --attention-dropout 0 "
             "--hidden-dropout 0 --log-interval 1 --eval-iters 0 --make-vocab-size-divisible-by 64").split()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")

    def run(*argv, processes=1):
        launcher = [sys.executable] if processes == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_port", str(free_port())]
        result = subprocess.run(launcher + [str(a) for a in argv], capture_output=True, text=True, timeout=300,
                                cwd=tmp_path, env=env)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
        return result.stdout + result.stderr

    run(ROOT / "pretrain_gpt.py", *flags, "--train-iters", "2", "--save", "ck", "--save-interval", "2",
        "--ckpt-format", "torch")
    convert = [ROOT / "tools" / "checkpoint" / "convert.py", "--model-type", "GPT", "--loader", "torch",
               "--saver", "torch", "--load-dir", "ck"]
    for target, extra in (("tp1", []), ("tp2", ["--target-tensor-parallel-size", "2"]),
                          ("pp2", ["--target-pipeline-parallel-size", "2"])):
        run(*convert, "--save-dir", target, *extra)
    full = torch_layout.read_model(str(tmp_path / "tp1" / "iter_0000002")).tensors
    assert "mtp.layers.0.transformer_layer.self_attention.linear_kv_up_proj.weight" in full
    for target in ("tp2", "pp2"):
        merged = torch_layout.read_model(str(tmp_path / target / "iter_0000002")).tensors
        assert set(merged) == set(full)
        for name, tensor in full.items():
            assert torch.equal(merged[name], tensor), (target, name)
    last_stage = torch_layout.read_rank_file(str(tmp_path / "pp2" / "iter_0000002" / "mp_rank_00_001"
                                                 / torch_layout.MODEL_FILENAME))["model"]
    assert "embedding.word_embeddings.weight" in last_stage and "mtp.layers.0.eh_proj.weight" in last_stage

    def losses(out):
        line = [ln for ln in out.splitlines() if regex.search(r"iteration\s+3/\s*3", ln)][0]
        return regex.search(r"lm loss: (\S+) \| mtp_1 loss: (\S+)", line).groups()

    # HuggingFace has no layout for them here: one line naming the flags.
    result = subprocess.run([sys.executable, str(convert[0]), *map(str, convert[1:6]), "hf", "--load-dir", "ck",
                             "--save-dir", "hf"], capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode != 0 and "--multi-latent-attention" in result.stdout + result.stderr
    assert "--mtp-num-layers" in result.stdout + result.stderr

    more = ["--train-iters", "3", "--no-load-optim", "--no-load-rng"]
    reference = losses(run(ROOT / "pretrain_gpt.py", *flags, *more, "--load", "tp1"))
    assert losses(run(ROOT / "pretrain_gpt.py", *flags, *more, "--load", "pp2", "--pipeline-model-parallel-size", "2",
                      processes=2)) == reference
    assert losses(run(ROOT / "pretrain_gpt.py", *flags, *more, "--load", "tp2", "--tensor-model-parallel-size", "2",
                      "--sequence-parallel", processes=2)) == reference


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "efficient", "math"])
def test_mla_on_cuda_in_bf16_matches_the_cpu_model(backend):
    """MLA's queries/keys (dq = qk_head_dim + qk_pos_emb_head_dim) and values (dv) have different
    head sizes: the CUDA SDPA kernels must take them, in bf16, forward and backward."""
    cpu = build(mla_config(mtp_num_layers=1))
    cuda = build(mla_config(mtp_num_layers=1, bf16=True, attention_backend=backend)).cuda()
    cuda.load_state_dict({k: v.to(torch.bfloat16) for k, v in cpu.state_dict().items()})
    ids, labels = batch()
    cpu.train()
    cuda.train()
    ref = cpu(ids, labels=labels)
    got = cuda(ids.cuda(), labels=labels.cuda())
    torch.testing.assert_close(got.float().cpu(), ref.detach(), rtol=0.05, atol=0.05)
    mtp = cuda.pop_mtp_losses()
    assert mtp.shape == (1, 2, 16)
    (got.float().mean() + mtp.float().mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in cuda.parameters() if p.grad is not None)
