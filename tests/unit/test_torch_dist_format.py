"""torch_dist format in one process: chunk geometry, round trip, integrity errors, interrupted
saves, vocabulary padding, strictness and conversion to and from the `torch` layout."""

import json
import math
import os

import pytest
import torch

from gigatron.core.checkpoint.dist import save as dist_save
from gigatron.core.checkpoint.dist import sharding
from gigatron.core.checkpoint.dist import (
    AsyncCheckpointSaver,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    load_torch_dist,
    read_full_model_tensors,
    save_torch_dist,
    verify_torch_dist_checkpoint,
)
from gigatron.core.convert.dist_convert import convert_torch_dist_to_torch, convert_torch_to_torch_dist
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.distributed import DDPConfig, DistributedDataParallel, finalize_model_grads
from gigatron.core.models.gpt import GPTModel
from gigatron.core.optim import OptimizerConfig, get_optimizer
from gigatron.core.parallel import tags
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.init import local_shard
from gigatron.core.transformer.config import TransformerConfig

VOCAB = 64


def _config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, swiglu=True, ffn_hidden_size=48,
                seq_length=8, attention_dropout=0.0, hidden_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def _build(seed=1234, vocab=VOCAB, optimizer=True, **kw):
    groups = ParallelGroups.single()
    model = GPTModel(_config(**kw), groups, vocab, seed=seed)
    ddp = DistributedDataParallel(DDPConfig(), model, groups)
    opt = get_optimizer(OptimizerConfig(lr=1e-2), [ddp], groups) if optimizer else None
    return groups, ddp, opt


def _step(groups, ddp, opt, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (2, 9), generator=g)
    ddp.zero_grad_buffer()
    opt.zero_grad()
    loss = ddp(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
    loss.backward()
    finalize_model_grads([ddp], groups)
    opt.step()
    return loss.item()


@pytest.fixture
def trained(tmp_path):
    groups, ddp, opt = _build()
    _step(groups, ddp, opt)
    path = str(tmp_path / "iter_0000001")
    save_torch_dist(path, [ddp], opt, {"iteration": 1, "args": {"lr": 0.01}}, groups)
    return path, groups, ddp, opt


# ------------------------------------------------------------------ chunk geometry


@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 3, 2), (1, 6), (5, 1)])
def test_flat_range_boxes_tile_every_range(shape):
    n = math.prod(shape)
    index = torch.arange(n).view(shape)
    for start in range(n):
        for end in range(start + 1, n + 1):
            position = start
            for offsets, sizes, flat in sharding.flat_range_boxes(shape, start, end):
                assert flat == position
                values = index[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].reshape(-1)
                assert torch.equal(values, torch.arange(flat, flat + values.numel()))  # contiguous box
                position += values.numel()
            assert position == end


@pytest.mark.parametrize("stride", [1, 2])
def test_tensor_parallel_shard_maps_to_global_chunks(stride):
    full = torch.arange(8 * 3, dtype=torch.float32).view(8, 3)
    tp = 2
    rebuilt = torch.full_like(full, -1)
    for rank in range(tp):
        shard = torch.nn.Parameter(local_shard(full, 0, stride, rank, tp).clone())
        tags.set_tensor_parallel_attributes(shard, True, 0, stride, rank=rank, world_size=tp)
        for data, offsets in sharding.local_box_to_global(shard.detach(), (0, 0), shard):
            rebuilt[offsets[0]:offsets[0] + data.shape[0]] = data
        # a flat range crossing the stride block boundary
        pieces = sharding.pieces_of_flat_range("k", shard.detach().reshape(-1)[2:10], shard, 2, True, False)
        assert sum(p.tensor.numel() for p in pieces) == 8
        for p in pieces:
            region = full[tuple(slice(o, o + s) for o, s in zip(p.global_offsets, p.sizes))]
            assert torch.equal(region, p.tensor)
    assert torch.equal(rebuilt, full)


# ------------------------------------------------------------------ round trip


def test_round_trip_restores_model_and_optimizer(trained):
    path, _, ddp, opt = trained
    groups, ddp2, opt2 = _build(seed=7)
    extra = load_torch_dist(path, [ddp2], opt2, groups)
    assert extra["iteration"] == 1 and extra["args"] == {"lr": 0.01}
    for (n1, p1), (n2, p2) in zip(ddp.module.named_parameters(), ddp2.module.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    full1, full2 = opt.state_dict_for_save(), opt2.state_dict_for_save()
    assert full1["step"] == full2["step"] == 1
    for name, record in full1["params"].items():
        for key, value in record.items():
            assert torch.equal(value, full2["params"][name][key]), (name, key)
    # both continue identically
    assert _step(groups, ddp, opt, seed=1) == _step(groups, ddp2, opt2, seed=1)
    for p1, p2 in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(p1, p2)


def test_metadata_json_lists_every_file_with_crc(trained):
    path = trained[0]
    record = json.load(open(os.path.join(path, "metadata.json")))
    assert record["sharded_backend"] == "torch_dist" and record["sharded_backend_version"] == 1
    assert set(record["files"]) == set(os.listdir(path)) - {"metadata.json"}
    assert "__0_0.distcp" in record["files"] and "common.pt" in record["files"]
    verify_torch_dist_checkpoint(path)


def test_rng_state_comes_back_at_the_same_layout(tmp_path):
    groups, ddp, opt = _build()
    state = {"torch_rng_state": torch.get_rng_state(), "note": "rank 0"}
    save_torch_dist(str(tmp_path), [ddp], opt, {}, groups, rng_state=state)
    extra = load_torch_dist(str(tmp_path), [ddp], opt, groups)
    assert torch.equal(extra["rng_state"]["torch_rng_state"], state["torch_rng_state"])
    assert extra["parallel_layout"]["world_size"] == 1


def test_save_before_any_step_has_no_moments(tmp_path):
    groups, ddp, opt = _build()
    save_torch_dist(str(tmp_path), [ddp], opt, {"iteration": 0}, groups)
    groups, ddp2, opt2 = _build(seed=5)
    load_torch_dist(str(tmp_path), [ddp2], opt2, groups)
    assert not any(opt2.optimizer.state.values())
    for p1, p2 in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(p1, p2)


# ------------------------------------------------------------------ integrity


def _data_file(path):
    return sorted(n for n in os.listdir(path) if n.endswith(".distcp"))[0]


def test_truncated_data_file_is_named(trained):
    path, groups, _, _ = trained
    name = _data_file(path)
    with open(os.path.join(path, name), "r+b") as handle:
        handle.truncate(os.path.getsize(os.path.join(path, name)) - 100)
    _, ddp2, opt2 = _build(seed=7)
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.") + ".*truncated"):
        load_torch_dist(path, [ddp2], opt2, groups)


def test_flipped_byte_is_named(trained):
    path, groups, _, _ = trained
    name = _data_file(path)
    full = os.path.join(path, name)
    with open(full, "r+b") as handle:
        handle.seek(os.path.getsize(full) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x10]))
    _, ddp2, opt2 = _build(seed=7)
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.") + ".*CRC-32"):
        load_torch_dist(path, [ddp2], opt2, groups)
    with pytest.raises(CorruptCheckpointError, match=name.replace(".", r"\.")):
        verify_torch_dist_checkpoint(path)


def test_save_interrupted_before_metadata_json_is_incomplete(tmp_path, monkeypatch):
    groups, ddp, opt = _build()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(dist_save, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        save_torch_dist(str(tmp_path), [ddp], opt, {"iteration": 3}, groups)
    assert ".metadata" in os.listdir(tmp_path) and "metadata.json" not in os.listdir(tmp_path)
    monkeypatch.undo()
    with pytest.raises(IncompleteCheckpointError, match="interrupted"):
        load_torch_dist(str(tmp_path), [ddp], opt, groups)


def test_background_write_failure_is_reported_and_leaves_no_marker(tmp_path, monkeypatch):
    groups, ddp, opt = _build()
    saver = AsyncCheckpointSaver()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(dist_save, "atomic_torch_save", broken)  # common.pt write fails in the background
    save_torch_dist(str(tmp_path), [ddp], opt, {"iteration": 3}, groups, async_saver=saver)
    with pytest.raises(CheckpointError, match="disk full"):
        saver.finalize_all()
    assert not os.path.exists(tmp_path / "metadata.json")
    saver.close()


def test_resave_into_existing_directory_replaces_the_marker(trained):
    path, groups, ddp, opt = trained
    _step(groups, ddp, opt, seed=4)
    save_torch_dist(path, [ddp], opt, {"iteration": 2}, groups)
    _, ddp2, opt2 = _build(seed=7)
    assert load_torch_dist(path, [ddp2], opt2, groups)["iteration"] == 2
    for p1, p2 in zip(ddp.module.parameters(), ddp2.module.parameters()):
        assert torch.equal(p1, p2)


# ------------------------------------------------------------------ compatibility checks


def test_vocabulary_padding_may_differ(tmp_path):
    groups, ddp, _ = _build(optimizer=False, untie_embeddings_and_output_weights=True)
    save_torch_dist(str(tmp_path / "a"), [ddp], None, {}, groups)
    _, bigger, _ = _build(seed=3, vocab=96, optimizer=False, untie_embeddings_and_output_weights=True)
    load_torch_dist(str(tmp_path / "a"), [bigger], None, groups)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        small_t, big_t = ddp.module.get_parameter(name), bigger.module.get_parameter(name)
        assert torch.equal(big_t[:VOCAB], small_t) and not big_t[VOCAB:].any()
    save_torch_dist(str(tmp_path / "b"), [bigger], None, {}, groups)
    _, back, _ = _build(seed=4, optimizer=False, untie_embeddings_and_output_weights=True)
    load_torch_dist(str(tmp_path / "b"), [back], None, groups)
    for p1, p2 in zip(ddp.module.parameters(), back.module.parameters()):
        assert torch.equal(p1, p2)


def test_other_model_shape_is_refused_with_names(trained):
    path, groups, _, _ = trained
    _, deeper, opt3 = _build(num_layers=3)
    with pytest.raises(CheckpointError, match=r"missing from checkpoint: decoder\.layers\.2\."):
        load_torch_dist(path, [deeper], opt3, groups)
    _, wider, opt4 = _build(ffn_hidden_size=64)
    with pytest.raises(CheckpointError, match=r"linear_fc1\.weight: checkpoint shape \(96, 32\) vs model \(128, 32\)"):
        load_torch_dist(path, [wider], opt4, groups)
    _, shallow, _ = _build(num_layers=1, optimizer=False)
    with pytest.raises(CheckpointError, match=r"not in the model: \['decoder\.layers\.1\."):
        load_torch_dist(path, [shallow], None, groups)
    load_torch_dist(path, [shallow], None, groups, strict=False)


def test_model_only_checkpoint_refuses_optimizer_load(tmp_path):
    groups, ddp, opt = _build()
    save_torch_dist(str(tmp_path), [ddp], None, {}, groups)
    with pytest.raises(CheckpointError, match="no-load-optim"):
        load_torch_dist(str(tmp_path), [ddp], opt, groups)


# ------------------------------------------------------------------ conversion


def _torch_format_checkpoint(root, ddp, tp):
    from gigatron.core.convert.protocol import state_to_messages
    from gigatron.core.convert.torch_format import metadata_from_args, save_torch_checkpoint

    args = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, swiglu=True,
                seq_length=8, max_position_embeddings=8, make_vocab_size_divisible_by=32)
    md = metadata_from_args(args, VOCAB, 5, torch.float32)
    tensors = {k: v.detach().clone() for k, v in ddp.module.state_dict().items()}
    return save_torch_checkpoint(state_to_messages(md, tensors), root, target_tp=tp)


def test_convert_torch_to_torch_dist_and_back(tmp_path):
    from gigatron.core.convert.torch_format import read_torch_checkpoint

    groups, ddp, _ = _build(optimizer=False)
    _torch_format_checkpoint(str(tmp_path / "torch"), ddp, tp=2)
    convert_torch_to_torch_dist(str(tmp_path / "torch"), str(tmp_path / "dist"))
    _, loaded, _ = _build(seed=9, optimizer=False)
    extra = load_torch_dist(str(tmp_path / "dist"), [loaded], None, groups)
    assert extra["iteration"] == 5
    for (name, p1), p2 in zip(ddp.module.named_parameters(), loaded.module.parameters()):
        assert torch.equal(p1, p2), name
    tensors, _ = read_full_model_tensors(str(tmp_path / "dist"))
    assert set(tensors) == set(dict(ddp.module.named_parameters()))
    convert_torch_dist_to_torch(str(tmp_path / "dist"), str(tmp_path / "back"), target_tp=1)
    _, merged = read_torch_checkpoint(str(tmp_path / "back"))
    for name, param in ddp.module.named_parameters():
        assert torch.equal(merged[name], param.detach()), name
