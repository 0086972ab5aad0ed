"""Mamba / hybrid models (MambaModel) in Megatron-Core's own checkpoint layouts, both directions.

Megatron-Core's MambaModel cannot be built here (its mixer needs mamba_ssm, its only layer spec
Transformer Engine), so the fixtures are written by hand from megatron-core 0.16.1's source
(megatron/core/ssm/mamba_block.py, mamba_layer.py, mamba_mixer.py, models/mamba/mamba_layer_specs.py),
with this file's own name table, not the product's:

- torch_dist: MambaStack.sharded_state_dict passes no layer offsets, so every layer keeps its own
  global number (`decoder.layers.{i}.…`, no stacked layer axis); the Transformer Engine spec fuses
  each norm into the following linear layer (`mixer.in_proj.layer_norm_weight`,
  `self_attention.linear_qkv.layer_norm_weight`, `mlp.linear_fc1.layer_norm_weight`);
  MambaMixer.sharded_state_dict splits in_proj.weight into `.z .x .B .C .dt` and conv1d.weight /
  .bias into `.x .B .C`, each part sharded evenly over the tensor-parallel ranks (its global
  tensor is the part's tp=1 rows); A_log, D, dt_bias and mixer.norm.weight are sharded on axis 0;
  every Transformer Engine linear adds an `_extra_state` ShardedObject (`…/shard_0_1`).
  The global tensors do not depend on the writer's tensor-parallel size.
- torch: rank r's state dict holds in_proj.weight rows [z_r; x_r; B_r; C_r; dt_r] and conv1d rows
  [x_r; B_r; C_r] (its slice of each part), column-parallel rows / row-parallel columns split evenly,
  `_extra_state: None` beside each Transformer Engine linear.

Every load must give the logits of the model the fixture was made from (1e-5, fp32).

Where megatron-core is installed, its own MambaMixer / MambaStack / MambaModel classes are built
too (tests/megatron_mamba_oracle.py: local linears and norm stand-ins for the packages it lacks,
no forward): at tp=2 they write torch_dist and `torch` checkpoints that we read (every rank's
parameters equal Megatron's, and its keys are the hand-written table's), and they load, strictly,
the torch_dist directories we write (training's save at tp=2, convert.py --saver megatron_dist)."""

import argparse
import json
import os
import sys

import pytest
import torch
import torch.distributed as dist

from gigatron.core.models.mamba import MambaModel
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.core.transformer.mamba.config import MambaConfig
from tests.parallel.harness import free_port, run_distributed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_mamba_oracle  # noqa: E402
import megatron_oracle  # noqa: E402

needs_megatron = pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed")

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB, HIDDEN, FFN, HEADS, QUERY_GROUPS = 64, 32, 48, 4, 2
HEAD_DIM, GROUPS, STATE = 8, 2, 8
NHEADS = 2 * HIDDEN // HEAD_DIM            # Megatron's default: expand 2
D_INNER = NHEADS * HEAD_DIM
PATTERN = "M*M-"
ITERATION = 7

# pretrain_mamba.py's flags for this model, as its args Namespace records them (plain values)
ARGS = dict(num_layers=len(PATTERN), hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
            kv_channels=HIDDEN // HEADS, group_query_attention=True, num_query_groups=QUERY_GROUPS,
            max_position_embeddings=16, seq_length=16, position_embedding_type="none", normalization="RMSNorm",
            norm_epsilon=1e-5, swiglu=True, add_bias_linear=False, add_qkv_bias=False,
            untie_embeddings_and_output_weights=True, hybrid_override_pattern=PATTERN, is_hybrid_model=True,
            mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS, mamba_num_heads=None,
            hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0, tokenizer_type="NullTokenizer", vocab_size=VOCAB - 1,
            padded_vocab_size=VOCAB, make_vocab_size_divisible_by=32, params_dtype="torch.float32", fp16=False,
            bf16=False, transformer_impl="transformer_engine", spec=None, iteration=ITERATION,
            consumed_train_samples=56, consumed_valid_samples=0, micro_batch_size=2, global_batch_size=8,
            ckpt_format="torch_dist", seed=1234)


def _model(tp=1, seed=5):
    cfg = TransformerConfig(num_layers=len(PATTERN), hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
                            group_query_attention=True, num_query_groups=QUERY_GROUPS, seq_length=16,
                            attention_dropout=0.0, hidden_dropout=0.0, normalization="RMSNorm", position_embedding_type="none", add_bias_linear=False,
                            swiglu=True, untie_embeddings_and_output_weights=True, tensor_model_parallel_size=tp)
    mc = MambaConfig(mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS,
                     hybrid_override_pattern=PATTERN, is_hybrid_model=True)
    groups = (ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=tp)) if tp > 1
              else ParallelGroups.single())
    model = MambaModel(cfg, mc, groups, VOCAB, seed=seed)
    with torch.no_grad():  # non-trivial norms and skip, so that a misplaced one shows in the logits
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight", ".D")):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    return model.eval(), groups


def _tokens():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, groups=None):
    with torch.no_grad():
        local = model(_tokens())  # [s, b, V/tp]
    if groups is None or groups.tp.size == 1:
        return local
    parts = [torch.empty_like(local) for _ in range(groups.tp.size)]
    dist.all_gather(parts, local.contiguous(), group=groups.tp.group)
    return torch.cat(parts, dim=-1)


# ------------------------------------------------------------------ Megatron-Core's names, by hand

IN_PROJ_PARTS = [("z", D_INNER), ("x", D_INNER), ("B", GROUPS * STATE), ("C", GROUPS * STATE), ("dt", NHEADS)]
CONV_PARTS = [("x", D_INNER), ("B", GROUPS * STATE), ("C", GROUPS * STATE)]
# our name (per layer) -> Megatron-Core's (the TE spec's fused norm names)
FUSED = {"norm.weight": "mixer.in_proj.layer_norm_weight",
         "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
         "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
TE_LINEARS = {"M": ("mixer.in_proj", "mixer.out_proj"),
              "*": ("self_attention.linear_qkv", "self_attention.linear_proj"),
              "-": ("mlp.linear_fc1", "mlp.linear_fc2")}


def _split_rows(tensor, parts):
    out, start = {}, 0
    for name, rows in parts:
        out[name] = tensor[start:start + rows]
        start += rows
    assert start == tensor.shape[0]
    return out


def megatron_dist_tensors(ours: dict) -> dict:
    """MambaModel.sharded_state_dict's global tensors (megatron-core 0.16.1) for our tp=1 state dict."""
    out = {}
    for name, tensor in ours.items():
        if not name.startswith("decoder.layers."):
            out[name] = tensor
            continue
        layer, rest = name[len("decoder.layers."):].split(".", 1)
        prefix = f"decoder.layers.{layer}."
        if rest == "mixer.in_proj.weight":
            out.update({f"{prefix}mixer.in_proj.weight.{p}": t for p, t in _split_rows(tensor, IN_PROJ_PARTS).items()})
        elif rest in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
            out.update({f"{prefix}{rest}.{p}": t for p, t in _split_rows(tensor, CONV_PARTS).items()})
        else:
            out[prefix + FUSED.get(rest, rest)] = tensor
    return out


def megatron_objects() -> list:
    """The `_extra_state` ShardedObjects of the TE linears (and Megatron's ColumnParallelLinear output layer)."""
    keys = [f"decoder.layers.{i}.{module}._extra_state/shard_0_1"
            for i, symbol in enumerate(PATTERN) for module in TE_LINEARS[symbol]]
    return keys + ["output_layer._extra_state/shard_0_1"]


def _tp_split(name: str, tensor: torch.Tensor, tp: int) -> list:
    """Megatron's tensor-parallel shards of one of its `torch` state-dict tensors (our tp=1 tensor)."""
    layer_part = name.split(".", 3)[-1] if name.startswith("decoder.layers.") else name
    if layer_part == "mixer.in_proj.weight":
        parts = _split_rows(tensor, IN_PROJ_PARTS)
        return [torch.cat([parts[p].chunk(tp)[r] for p, _ in IN_PROJ_PARTS]) for r in range(tp)]
    if layer_part in ("mixer.conv1d.weight", "mixer.conv1d.bias"):
        parts = _split_rows(tensor, CONV_PARTS)
        return [torch.cat([parts[p].chunk(tp)[r] for p, _ in CONV_PARTS]) for r in range(tp)]
    if layer_part == "mlp.linear_fc1.weight":  # SwiGLU [gate; up]: each rank [gate_r; up_r]
        gate, up = tensor.chunk(2)
        return [torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]) for r in range(tp)]
    if layer_part in ("mixer.A_log", "mixer.D", "mixer.dt_bias", "mixer.norm.weight",
                      "self_attention.linear_qkv.weight", "embedding.word_embeddings.weight", "output_layer.weight"):
        return list(tensor.chunk(tp, dim=0))  # query groups split whole: [q.., k, v] per group
    if layer_part in ("mixer.out_proj.weight", "self_attention.linear_proj.weight", "mlp.linear_fc2.weight"):
        return list(tensor.chunk(tp, dim=1))
    return [tensor] * tp  # norms


def megatron_torch_states(ours: dict, tp: int) -> list:
    """Each tensor-parallel rank's `model` state dict of Megatron-LM's torch format (pipeline size 1)."""
    ranks = [{} for _ in range(tp)]
    for name, tensor in ours.items():
        key = name
        if name.startswith("decoder.layers."):
            layer, rest = name[len("decoder.layers."):].split(".", 1)
            key = f"decoder.layers.{layer}.{FUSED.get(rest, rest)}"
        for r, shard in enumerate(_tp_split(key, tensor, tp)):
            ranks[r][key] = shard.clone()
    for r in range(tp):
        for i, symbol in enumerate(PATTERN):
            for module in TE_LINEARS[symbol]:
                ranks[r][f"decoder.layers.{i}.{module}._extra_state"] = None
        ranks[r]["output_layer._extra_state"] = None
    return ranks


def write_megatron_dist_fixture(root: str, ours: dict) -> str:
    """A Megatron-Core torch_dist directory of the model: the .distcp/.metadata of PyTorch's writer
    (what dist_checkpointing's torch_dist backend writes), common.pt, metadata.json, the tracker."""
    import io

    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint import save as dcp_save

    iter_dir = os.path.join(root, f"iter_{ITERATION:07d}")
    os.makedirs(iter_dir)
    state = dict(megatron_dist_tensors(ours))
    for key in megatron_objects():
        buffer = io.BytesIO()
        torch.save([None], buffer)
        state[key] = buffer
    dcp_save(state, storage_writer=FileSystemWriter(iter_dir), no_dist=True)
    torch.save({"args": argparse.Namespace(**ARGS), "checkpoint_version": 3.0, "iteration": ITERATION,
                "num_floating_point_operations_so_far": 0.0}, os.path.join(iter_dir, "common.pt"))
    with open(os.path.join(iter_dir, "metadata.json"), "w") as handle:
        json.dump({"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
                   "common_backend_version": 1}, handle)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(str(ITERATION))
    return root


def write_megatron_torch_fixture(root: str, ours: dict, tp: int) -> str:
    args = argparse.Namespace(**dict(ARGS, tensor_model_parallel_size=tp, pipeline_model_parallel_size=1,
                                     ckpt_format="torch"))
    for r, model in enumerate(megatron_torch_states(ours, tp)):
        path = os.path.join(root, f"iter_{ITERATION:07d}", f"mp_rank_{r:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path))
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION, "model": model}, path)
    with open(os.path.join(root, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write(str(ITERATION))
    return root


# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def reference():
    model, _ = _model()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, _logits(model)


@pytest.fixture(scope="module")
def dist_fixture(reference, tmp_path_factory):
    return write_megatron_dist_fixture(str(tmp_path_factory.mktemp("mcore_mamba_dist")), reference[0])


@pytest.fixture(scope="module")
def torch_tp2_fixture(reference, tmp_path_factory):
    return write_megatron_torch_fixture(str(tmp_path_factory.mktemp("mcore_mamba_torch")), reference[0], 2)


def _convert(load_dir, save_dir, saver, *extra):
    """tools/checkpoint/convert.py --loader core --saver SAVER, in this process."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "checkpoint"))
    import convert

    convert.main(["--model-type", "GPT", "--loader", "core", "--saver", saver, "--load-dir", str(load_dir),
                  "--save-dir", str(save_dir), *extra])
    return save_dir


# ------------------------------------------------------------------ reading Megatron's layouts


def test_names_match_megatron_cores_source(reference):
    """The hand-written table covers every tensor of the model (and nothing stacked)."""
    keys = megatron_dist_tensors(reference[0])
    assert "decoder.layers.0.mixer.in_proj.weight.dt" in keys and "decoder.layers.2.mixer.conv1d.bias.C" in keys
    assert keys["decoder.layers.0.mixer.in_proj.weight.z"].shape == (D_INNER, HIDDEN)
    assert keys["decoder.layers.1.self_attention.linear_qkv.layer_norm_weight"].shape == (HIDDEN,)
    assert not any(k.startswith("decoder.layers.") and not k[len("decoder.layers."):][0].isdigit() for k in keys)


def test_read_megatron_dist(dist_fixture, reference):
    import gigatron
    from gigatron.core.checkpoint import formats

    state = formats.read_model(dist_fixture)
    assert state.iteration == ITERATION
    assert set(state.tensors) == set(reference[0])
    for name, tensor in reference[0].items():
        assert torch.equal(state.tensors[name], tensor), name
    pretrained = gigatron.from_pretrained(dist_fixture)
    assert isinstance(pretrained.model, MambaModel)
    torch.testing.assert_close(_logits(pretrained.model), reference[1], rtol=0, atol=1e-5)


def test_read_megatron_torch_at_tp2(torch_tp2_fixture, reference):
    import gigatron

    pretrained = gigatron.from_pretrained(torch_tp2_fixture)
    torch.testing.assert_close(_logits(pretrained.model), reference[1], rtol=0, atol=1e-5)


def test_load_checkpoint_megatron_dist_at_tp1(dist_fixture, reference):
    """Training's --load path (per-chunk reads of Megatron's per-layer and split keys)."""
    from gigatron.training.checkpointing import load_checkpoint

    model, groups = _model(seed=99)
    loaded = load_checkpoint(dist_fixture, [model], None, None, groups, load_optim=False)
    assert (loaded.iteration, loaded.consumed_train_samples) == (ITERATION, 56)
    torch.testing.assert_close(_logits(model), reference[1], rtol=0, atol=1e-5)


def _tp2_worker(rank, world_size, roots, save_root):
    """At tp=2: load each checkpoint of `roots` ({name: dir}) and return the logits and this rank's
    parameters; then save the last model with training's --ckpt-format megatron_torch_dist."""
    from gigatron.core.checkpoint import megatron_dist
    from gigatron.training.checkpointing import load_checkpoint

    out = {}
    for which, root in roots.items():
        model, groups = _model(tp=2, seed=99)
        load_checkpoint(root, [model], None, None, groups, load_optim=False)
        out[which] = {"logits": _logits(model, groups), "params": {k: v.clone() for k, v in model.state_dict().items()}}
    model, groups = _model(tp=2, seed=99)
    load_checkpoint(roots["dist"], [model], None, None, groups, load_optim=False)
    megatron_dist.save_training_state(save_root, ITERATION, [model], None, groups,
                                      {"args": dict(ARGS, tensor_model_parallel_size=2), "iteration": ITERATION})
    return out


@pytest.fixture(scope="module")
def ours_tp2(dist_fixture, torch_tp2_fixture, tmp_path_factory):
    """Two tensor-parallel ranks load the fixtures (and Megatron-Core's own checkpoints where it is
    installed) and save with training's --ckpt-format megatron_torch_dist."""
    roots = {"dist": dist_fixture, "torch": torch_tp2_fixture}
    if megatron_oracle.megatron_available():
        written = tmp_path_factory.mktemp("mcore_mamba_written")
        megatron_mamba_oracle.run("write", "--root", str(written), processes=2, port=free_port())
        roots.update(megatron_dist=str(written), megatron_torch=str(written / "torch"))
    saved = tmp_path_factory.mktemp("ours_saved_tp2")
    results = run_distributed(_tp2_worker, 2, roots, str(saved), timeout=300)
    return results, roots, str(saved)


def test_load_at_tp2(ours_tp2, reference):
    """Two tensor-parallel ranks read Megatron's torch_dist and torch fixtures (in_proj and conv1d
    split part by part) and get the model's logits."""
    results, _, _ = ours_tp2
    for result in results:
        for which in ("dist", "torch"):
            torch.testing.assert_close(result[which]["logits"], reference[1], rtol=0, atol=1e-5)


def test_training_save_at_tp2_writes_megatrons_keys(ours_tp2, reference):
    """Training's megatron_torch_dist save at tp=2 writes exactly the table's keys, global tensors
    and `_extra_state` objects."""
    from gigatron.core.checkpoint.dist import read_dcp_metadata
    from gigatron.core.checkpoint.megatron_dist import read_model

    _, _, saved = ours_tp2
    iter_dir = os.path.join(saved, f"iter_{ITERATION:07d}")
    metadata = read_dcp_metadata(iter_dir)
    expected = megatron_dist_tensors(reference[0])
    tensor_keys = {k for k, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    assert tensor_keys == set(expected)
    assert set(megatron_objects()) <= {i.fqn for i in metadata.storage_data}
    for name, tensor in read_model(iter_dir).tensors.items():
        assert torch.equal(tensor, reference[0][name]), name


# ------------------------------------------------------------------ Megatron-Core's own classes


@needs_megatron
def test_megatron_cores_keys_are_the_tables(ours_tp2, reference):
    from gigatron.core.checkpoint.dist import read_dcp_metadata

    _, roots, _ = ours_tp2
    metadata = read_dcp_metadata(os.path.join(roots["megatron_dist"], f"iter_{ITERATION:07d}"))
    expected = megatron_dist_tensors(reference[0])  # the same model dimensions
    tensors = {k: tuple(md.size) for k, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    assert tensors == {k: tuple(t.shape) for k, t in expected.items()}
    assert set(megatron_objects()) <= {i.fqn for i in metadata.storage_data}


@needs_megatron
def test_read_megatron_cores_own_checkpoints_at_tp2(ours_tp2):
    """Megatron-Core's tp=2 torch_dist and `torch` checkpoints: read whole (from_pretrained's path)
    they split into exactly each rank's Megatron parameters by the table's tensor-parallel rules,
    and two tensor-parallel ranks of ours load exactly Megatron's rank parameters."""
    from gigatron.core.checkpoint import formats

    results, roots, _ = ours_tp2
    theirs = [torch.load(os.path.join(roots["megatron_dist"], f"weights_rank{r}.pt"), weights_only=True)
              for r in range(2)]
    whole = formats.read_model(roots["megatron_dist"]).tensors
    from_torch = formats.read_model(roots["megatron_torch"], allow_namespace=True).tensors
    assert set(whole) == set(from_torch) == set(theirs[0])
    for name, tensor in whole.items():
        assert torch.equal(from_torch[name], tensor), name
        for r, shard in enumerate(_tp_split(name, tensor, 2)):
            assert torch.equal(shard, theirs[r][name]), (name, r)
    for r, result in enumerate(results):
        for which in ("megatron_dist", "megatron_torch"):
            params = result[which]["params"]
            assert set(params) == set(theirs[r])
            for name, tensor in theirs[r].items():
                assert torch.equal(params[name], tensor), (which, name, r)


@needs_megatron
def test_megatron_core_loads_what_we_write(ours_tp2, reference, tmp_path):
    """Megatron-Core's MambaModel at tp=2 loads (dist_checkpointing.load, strict load_state_dict)
    training's megatron_torch_dist save and convert.py --saver megatron_dist's output: its rank
    parameters are ours, split by the table's tensor-parallel rules."""
    from gigatron.core.checkpoint import formats

    _, roots, saved = ours_tp2
    theirs = formats.read_model(roots["megatron_dist"]).tensors  # Megatron's own model, whole
    converted = _convert(roots["megatron_torch"], tmp_path / "converted", "megatron_dist")
    written = {"training": (saved, reference[0]), "converted": (str(converted), theirs)}
    megatron_mamba_oracle.run("load", "--root", str(tmp_path), "--iter-dir",
                              *[os.path.join(root, f"iter_{ITERATION:07d}") for root, _ in written.values()],
                              processes=2, port=free_port())
    for i, (which, (_, expected)) in enumerate(written.items()):
        for r in range(2):
            loaded = torch.load(tmp_path / f"loaded{i}_rank{r}.pt", weights_only=True)
            assert set(loaded) == set(expected)
            for name, tensor in expected.items():
                assert torch.equal(loaded[name], _tp_split(name, tensor, 2)[r]), (which, name, r)


# ------------------------------------------------------------------ writing Megatron's layouts


def test_convert_to_megatron_dist(torch_tp2_fixture, reference, tmp_path):
    """convert.py --loader core (Megatron's torch files at tp=2) --saver megatron_dist: Megatron-Core's
    keys, global tensors and `_extra_state` objects."""
    from gigatron.core.checkpoint import formats
    from gigatron.core.checkpoint.dist import read_dcp_metadata
    from gigatron.core.checkpoint.dist.metadata import looks_like_megatron_torch_dist

    out = _convert(torch_tp2_fixture, tmp_path / "dist", "megatron_dist")
    iter_dir = str(out / f"iter_{ITERATION:07d}")
    assert looks_like_megatron_torch_dist(iter_dir)
    metadata = read_dcp_metadata(iter_dir)
    expected = megatron_dist_tensors(reference[0])
    tensor_keys = {k for k, md in metadata.state_dict_metadata.items() if hasattr(md, "chunks")}
    assert tensor_keys == set(expected)
    for key, tensor in expected.items():
        assert tuple(metadata.state_dict_metadata[key].size) == tuple(tensor.shape), key
    assert set(megatron_objects()) <= {i.fqn for i in metadata.storage_data}
    for name, tensor in formats.read_model(str(out)).tensors.items():
        assert torch.equal(tensor, reference[0][name]), name


@pytest.mark.parametrize("tp", [1, 2])
def test_convert_to_megatron_torch(dist_fixture, reference, tmp_path, tp):
    """convert.py --loader core (Megatron-Core's torch_dist) --saver megatron_torch at tp 1 and 2:
    every rank file holds exactly Megatron-LM's state dict (fused names, per-rank parts, _extra_state)."""
    import gigatron
    from gigatron.core.checkpoint.io import safe_torch_load

    out = _convert(dist_fixture, tmp_path / "torch", "megatron_torch", "--target-tensor-parallel-size", str(tp))
    for r, expected in enumerate(megatron_torch_states(reference[0], tp)):
        state = safe_torch_load(str(out / f"iter_{ITERATION:07d}" / f"mp_rank_{r:02d}" / "model_optim_rng.pt"),
                                allow_namespace=True)
        assert state["args"].tensor_model_parallel_size == tp and state["args"].hybrid_override_pattern == PATTERN
        assert set(state["model"]) == set(expected)
        for key, tensor in expected.items():
            if tensor is not None:
                assert torch.equal(state["model"][key], tensor), key
    torch.testing.assert_close(_logits(gigatron.from_pretrained(str(out)).model), reference[1], rtol=0, atol=1e-5)


# ------------------------------------------------------------------ training state


def _training(use_distributed_optimizer, seed=5):
    from gigatron.core.distributed import DDPConfig, DistributedDataParallel
    from gigatron.core.optim import OptimizerConfig, get_optimizer

    model, groups = _model(seed=seed)
    model.train()
    ddp = DistributedDataParallel(DDPConfig(use_distributed_optimizer=use_distributed_optimizer), model, groups)
    optimizer = get_optimizer(OptimizerConfig(lr=1e-2, weight_decay=0.1, clip_grad=1.0,
                                              use_distributed_optimizer=use_distributed_optimizer), [ddp], groups)
    return groups, ddp, optimizer


def _step(groups, ddp, optimizer, iteration):
    from gigatron.core.distributed import finalize_model_grads

    batch = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(100 + iteration))
    ddp.zero_grad_buffer()
    optimizer.zero_grad()
    loss = ddp(batch[:, :-1], None, None, labels=batch[:, 1:]).float().mean()
    loss.backward()
    finalize_model_grads([ddp], groups)
    assert optimizer.step()[0]
    return loss.item()


def test_training_state_round_trip(tmp_path):
    """A hybrid model's weights and Adam state saved in Megatron-Core's layout (training's
    --ckpt-format megatron_torch_dist, plain optimizer) resume into the distributed optimizer:
    the next losses are the uninterrupted run's."""
    from gigatron.core.checkpoint import megatron_dist
    from gigatron.core.checkpoint.dist import read_dcp_metadata
    from gigatron.training.checkpointing import load_checkpoint

    groups, ddp, optimizer = _training(False)
    for it in range(2):
        _step(groups, ddp, optimizer, it)
    megatron_dist.save_training_state(str(tmp_path), 2, [ddp], optimizer, groups, {"args": ARGS, "iteration": 2})
    expected = [_step(groups, ddp, optimizer, it) for it in range(2, 4)]
    keys = set(read_dcp_metadata(str(tmp_path / "iter_0000002")).state_dict_metadata)
    assert "optimizer.state.exp_avg.decoder.layers.0.mixer.in_proj.weight.dt" in keys
    assert "optimizer.state.exp_avg_sq.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight" in keys
    groups, ddp, optimizer = _training(True, seed=77)
    assert load_checkpoint(str(tmp_path), [ddp], optimizer, None, groups).iteration == 2
    resumed = [_step(groups, ddp, optimizer, it) for it in range(2, 4)]
    torch.testing.assert_close(torch.tensor(resumed), torch.tensor(expected), rtol=0, atol=1e-6)
