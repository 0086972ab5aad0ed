"""A hybrid Mamba model saved at one tensor-parallel size loads at another (gloo, CPU).

The mixer's fused in_proj [z; x; B; C; dt] and conv1d [x; B; C] rows are split over the ranks
segment by segment, so the concatenated rank shards are not the tp=1 tensor: the partition
segments tag (gigatron/core/parallel/tags.py) makes the torch_dist sharding store the tp=1 tensor
and tp_layout merge/split the `torch` format's rank files through the segments.

Two gloo ranks build the tp=2 model with seed A (initialization is layout independent: it equals
the tp=1 model of seed A) and save it in both formats; models of another seed load it at tp=2 (in
the workers) and at tp=1 (in this process); every load must give the tp=1 model's logits.
"""

import os

import pytest
import torch
import torch.distributed as dist

from gigatron.core.checkpoint import torch_layout
from gigatron.core.checkpoint.dist import load_torch_dist, read_model as read_dist_model, save_torch_dist
from gigatron.core.checkpoint.tp_layout import mamba_segments, merge_from_tp, split_for_tp
from gigatron.core.models.mamba import MambaModel
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig
from tests.parallel.harness import run_distributed

VOCAB = 64
SEED, OTHER_SEED = 5, 77
HIDDEN, HEAD_DIM, GROUPS, STATE = 32, 8, 2, 8
ARGS = {"tensor_model_parallel_size": 2, "pipeline_model_parallel_size": 1, "num_layers": 4, "hidden_size": HIDDEN,
        "swiglu": True, "mamba_state_dim": STATE, "mamba_head_dim": HEAD_DIM, "mamba_num_groups": GROUPS,
        "mamba_num_heads": None, "hybrid_override_pattern": "M*M-"}

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _model(tp, seed):
    cfg = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=4, seq_length=16,
                            attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm",
                            position_embedding_type="none", add_bias_linear=False, swiglu=True,
                            tensor_model_parallel_size=tp)
    mc = MambaConfig(mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS,
                     hybrid_override_pattern="M*M-", is_hybrid_model=True)
    groups = (ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp)) if dist.is_initialized()
              else ParallelGroups.single())
    model = MambaModel(cfg, mc, groups, VOCAB, seed=seed)
    model.eval()
    return model, groups


def _logits(model, groups):
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        local = model(ids)  # [s, b, V/tp]
    if groups.tp.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.tp.size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp.group)
    return torch.cat(parts, dim=-1)


def _worker(rank, world_size, root):
    model, groups = _model(world_size, SEED)
    saved_logits = _logits(model, groups)
    save_torch_dist(os.path.join(root, "dist"), [model], None, {"iteration": 1, "args": ARGS}, groups)
    torch_layout.save_training_state(os.path.join(root, "torch"), 1, [model], None, groups,
                                     {"args": ARGS, "iteration": 1})
    out = {"saved": saved_logits, "shards": {k: v.clone() for k, v in model.state_dict().items()}}
    fresh, _ = _model(world_size, OTHER_SEED)
    out["fresh"] = _logits(fresh, groups)
    load_torch_dist(os.path.join(root, "dist"), [fresh], None, groups)
    out["dist"] = _logits(fresh, groups)
    fresh, _ = _model(world_size, OTHER_SEED)
    torch_layout.load_training_state(os.path.join(root, "torch", "iter_0000001"), [fresh], None, groups)
    out["torch"] = _logits(fresh, groups)
    return out


def test_mamba_checkpoint_saved_at_tp2_loads_at_tp1_and_tp2(tmp_path):
    results = run_distributed(_worker, 2, str(tmp_path), timeout=300)
    reference, groups = _model(1, SEED)
    ref_logits = _logits(reference, groups)
    ref_state = reference.state_dict()
    for rank, got in enumerate(results):
        torch.testing.assert_close(got["saved"], ref_logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got["fresh"], ref_logits, atol=1e-3)  # another seed: loading must matter
        torch.testing.assert_close(got["dist"], got["saved"], rtol=0, atol=0, msg=f"torch_dist at tp=2, rank {rank}")
        torch.testing.assert_close(got["torch"], got["saved"], rtol=0, atol=0, msg=f"torch at tp=2, rank {rank}")

    # torch_dist at tp=1: the stored tensors are the tp=1 ones
    fresh, groups = _model(1, OTHER_SEED)
    load_torch_dist(str(tmp_path / "dist"), [fresh], None, groups)
    torch.testing.assert_close(_logits(fresh, groups), ref_logits, rtol=1e-5, atol=1e-5)
    stored = read_dist_model(str(tmp_path / "dist")).tensors
    for name, tensor in ref_state.items():
        assert torch.equal(stored[name], tensor), name

    # torch at tp=1: the rank files merged through the segments are the tp=1 tensors
    merged = torch_layout.read_model(str(tmp_path / "torch" / "iter_0000001")).tensors
    for name, tensor in ref_state.items():
        assert torch.equal(merged[name], tensor), name
    fresh, groups = _model(1, OTHER_SEED)
    fresh.load_state_dict(merged, strict=True)
    torch.testing.assert_close(_logits(fresh, groups), ref_logits, rtol=1e-5, atol=1e-5)

    # and split again for tp=2 (what conversion writes): exactly the saved rank files
    for name, full in merged.items():
        shards = split_for_tp(name, full, 2, True, mamba_segments(name, ARGS))
        for rank, shard in enumerate(shards):
            assert torch.equal(shard, results[rank]["shards"][name]), f"{name} rank {rank}"


def test_segmented_tensor_needs_its_segments():
    full = torch.arange(12.0)
    with pytest.raises(ValueError, match="segment by segment"):
        split_for_tp("decoder.layers.0.mixer.in_proj.weight", full, 2, False)
    with pytest.raises(ValueError, match="segment by segment"):
        merge_from_tp("decoder.layers.0.mixer.conv1d.bias", [full[:6], full[6:]], False)
    with pytest.raises(ValueError, match="lack"):
        mamba_segments("decoder.layers.0.mixer.in_proj.weight", {"hidden_size": 32})
    assert mamba_segments("decoder.layers.0.mixer.out_proj.weight", {}) is None
    # [z, x, B, C, dt] of 2*32 inner channels, 2 groups of state 8, 8 heads
    assert mamba_segments("decoder.layers.3.mixer.in_proj.weight", ARGS) == [64, 64, 16, 16, 8]
    shards = split_for_tp("decoder.layers.0.mixer.conv1d.bias", torch.arange(96.0), 2, False, [64, 16, 16])
    assert shards[0].tolist() == list(range(32)) + list(range(64, 72)) + list(range(80, 88))


def test_megatron_te_names_of_a_mamba_checkpoint_are_read(tmp_path):
    """A `torch` checkpoint as Megatron's Transformer Engine spec writes it (the Mamba layer's norm
    fused into in_proj as mixer.in_proj.layer_norm_weight, the attention and MLP norms into
    linear_qkv / linear_fc1), at tp=2: read_model gives our names and the tp=1 tensors."""
    from gigatron.core.checkpoint.header import checkpoint_header

    reference, _ = _model(1, SEED)
    full = reference.state_dict()
    to_te = {"norm.weight": "mixer.in_proj.layer_norm_weight",
             "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    iter_dir = str(tmp_path / "iter_0000001")
    records = {}
    for rank in range(2):
        state = {}
        for name, tensor in full.items():
            prefix, _, suffix = name.partition(".layers.")
            layer, _, rest = suffix.partition(".")
            te_name = f"{prefix}.layers.{layer}.{to_te[rest]}" if rest in to_te else name
            state[te_name] = split_for_tp(name, tensor, 2, True, mamba_segments(name, ARGS))[rank].clone()
        header = checkpoint_header(dict(ARGS), 1)
        relative, record = torch_layout.write_rank_file(iter_dir, f"mp_rank_{rank:02d}/model_optim_rng.pt",
                                                        dict(header, model=state))
        records[relative] = record
    torch_layout.finish_save(str(tmp_path), iter_dir, 1, records)
    merged = torch_layout.read_model(iter_dir).tensors
    assert set(merged) == set(full)
    for name, tensor in full.items():
        assert torch.equal(merged[name], tensor), name
