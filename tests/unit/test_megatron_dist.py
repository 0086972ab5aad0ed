"""Megatron-Core's own torch_dist checkpoints (dist_checkpointing.save of its GPTModel's
sharded_state_dict plus common.pt, written by megatron-core in subprocesses at tp/pp 1 and 2, see
tests/megatron_oracle.py) load as they are: from_pretrained, convert.py --loader core and
training's load_checkpoint give Megatron-Core's own logits (its forward after its own load at
tp=pp=1) within 1e-5 in fp32, for GPT-2-style and Llama-style (RoPE, RMSNorm, SwiGLU, GQA) models."""

import dataclasses
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import megatron_oracle as oracle  # noqa: E402
from script_server import run_python  # noqa: E402

import gigatron  # noqa: E402
from gigatron.core.checkpoint import formats  # noqa: E402
from gigatron.core.checkpoint.io import CheckpointError  # noqa: E402
from tests.parallel.harness import free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not oracle.megatron_available(), reason="megatron-core is not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAYOUTS = [("gpt", 1, 1), ("llama", 1, 1), ("llama", 2, 1), ("gpt", 1, 2), ("llama", 2, 2)]


def write_megatron_dist(root, kind, tp, pp, layers=2):
    """A Megatron-Core torch_dist checkpoint at iteration 5 written at (tp, pp), and the reference
    logits of Megatron-Core loading it at tp=pp=1."""
    oracle.run_oracle("write-dist", "--kind", kind, "--root", str(root), "--tp", str(tp), "--pp", str(pp),
                      "--layers", str(layers), processes=tp * pp, port=free_port())
    oracle.run_oracle("logits", "--kind", kind, "--root", str(root), "--layers", str(layers), port=free_port())
    return root


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: f"{p[0]}-tp{p[1]}-pp{p[2]}")
def megatron_ckpt(request, tmp_path_factory):
    kind, tp, pp = request.param
    root = tmp_path_factory.mktemp(f"mcore_dist_{kind}_{tp}_{pp}")
    return write_megatron_dist(root, kind, tp, pp, layers=4 if pp > 1 else 2), kind


def _reference(root):
    return torch.load(os.path.join(root, "reference.pt"), weights_only=True)


def test_detected_with_megatron_keys(megatron_ckpt):
    root, kind = megatron_ckpt
    iter_dir, iteration, module = formats.locate(str(root))
    assert module.NAME == "megatron_torch_dist" and iteration == 5
    from gigatron.core.checkpoint.dist import read_dcp_metadata

    keys = set(read_dcp_metadata(iter_dir).state_dict_metadata)
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys  # stacked, fused norm name
    assert not any(k.startswith("decoder.layers.0.") for k in keys)
    args = formats.read_args(str(root))
    assert args["swiglu"] == (kind == "llama") and args["attention_backend"] == "AttnBackend.auto"


def test_from_pretrained_matches_megatron_logits(megatron_ckpt):
    root, _ = megatron_ckpt
    ref = _reference(root)
    with torch.no_grad():
        out = gigatron.from_pretrained(root)(ref["tokens"])
    torch.testing.assert_close(out, ref["logits"], rtol=0, atol=1e-5)


def test_load_checkpoint_matches_megatron_logits(megatron_ckpt):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = megatron_ckpt
    ref = _reference(root)
    template = gigatron.from_pretrained(root)
    model = GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=42)
    loaded = load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    assert (loaded.iteration, loaded.consumed_train_samples, loaded.num_floating_point_operations_so_far) == (5, 40,
                                                                                                              123.0)
    with torch.no_grad():
        logits = model.eval()(ref["tokens"], None, None).transpose(0, 1)
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="--no-load-optim"):
        load_checkpoint(str(root), [model], object(), None, ParallelGroups.single())


def test_load_restores_megatron_rng_state_at_the_writers_layout(megatron_ckpt):
    """Megatron-LM's rng_state ShardedObject (a pickled list with numpy arrays) is restored."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = megatron_ckpt
    args = formats.read_args(str(root))
    if (args["tensor_model_parallel_size"], args["pipeline_model_parallel_size"]) != (1, 1):
        pytest.skip("RNG states are restored at the writer's layout only")
    template = gigatron.from_pretrained(root)
    model = GPTModel(template.config, ParallelGroups.single(), template.padded_vocab_size, seed=42)
    torch.manual_seed(0)
    load_checkpoint(str(root), [model], None, None, ParallelGroups.single(), load_optim=False)
    saved = torch.load(os.path.join(root, "torch_rng_rank0.pt"), weights_only=True)
    assert torch.equal(torch.get_rng_state(), saved)


def test_convert_loader_core(megatron_ckpt, tmp_path):
    root, kind = megatron_ckpt
    if kind != "llama":
        pytest.skip("one model family is enough for the converter")
    out = run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type",
                      "GPT", "--loader", "core", "--saver", "core", "--load-dir", str(root), "--save-dir",
                      str(tmp_path / "ours")], timeout=300, cwd=ROOT,
                     env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    ref = _reference(root)
    with torch.no_grad():
        logits = gigatron.from_pretrained(tmp_path / "ours")(ref["tokens"])
    torch.testing.assert_close(logits, ref["logits"], rtol=0, atol=1e-5)


def test_model_of_another_shape_is_refused(megatron_ckpt):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = megatron_ckpt
    config = dataclasses.replace(gigatron.from_pretrained(root).config, num_layers=1)
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(str(root), [GPTModel(config, ParallelGroups.single(), oracle.VOCAB)], None, None,
                        ParallelGroups.single(), load_optim=False)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


@pytest.mark.parametrize("poisoned", ["common.pt", ".metadata"])
def test_poisoned_files_are_refused_and_run_nothing(megatron_ckpt, tmp_path, poisoned):
    import pickle
    import shutil

    root, kind = megatron_ckpt
    if kind != "gpt":
        pytest.skip("one model family is enough")
    copy = tmp_path / "ckpt"
    shutil.copytree(root, copy)
    marker = tmp_path / "PWNED"
    target = copy / "iter_0000005" / poisoned
    if poisoned == "common.pt":
        common = {"args": _Payload(marker), "iteration": 5}
        torch.save(common, target)
    else:
        target.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError):
        gigatron.from_pretrained(copy)
    with pytest.raises(CheckpointError):
        formats.read_args(str(copy)) if poisoned == "common.pt" else formats.read_model(str(copy))
    assert not marker.exists()


def test_pretrain_gpt_resumes_a_megatron_core_run(megatron_ckpt, tmp_path):
    root, kind = megatron_ckpt
    args = formats.read_args(str(root))
    if kind != "gpt" or args["pipeline_model_parallel_size"] != 1:
        pytest.skip("one end-to-end run is enough")
    out = run_python(
        [os.path.join(ROOT, "pretrain_gpt.py"), "--load", str(root), "--use-checkpoint-args",
         "--no-load-optim", "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", "6",
         "--mock-data", "--lr", "1e-4", "--eval-iters", "0", "--attention-dropout", "0", "--hidden-dropout", "0",
         "--distributed-backend", "gloo", "--use-cpu-initialization", "--log-interval", "1",
         "--data-cache-path", str(tmp_path / "cache")],
        timeout=300, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "iteration        6/       6" in log and "iteration        5/" not in log


def test_generate_text_and_tasks_accept_it(megatron_ckpt, tmp_path):
    """The server's engine builder (tools/generate_text.py) and tasks/main.py load a Megatron-Core
    torch_dist directory like any other checkpoint."""
    root, kind = megatron_ckpt
    args = formats.read_args(str(root))
    if kind != "llama" or args["tensor_model_parallel_size"] != 1 or args["pipeline_model_parallel_size"] != 1:
        pytest.skip("one model is enough")
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = run_python([os.path.join(ROOT, "tools", "generate_text.py"), "--load", str(root),
                      "--use-checkpoint-args", "--prompt", "1 2 3", "--tokens-to-generate", "3"],
                     timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    wiki = tmp_path / "wiki.test.tokens"
    wiki.write_text(" ".join(str(i % 40 + 1) for i in range(60)) + " \n")
    out = run_python([os.path.join(ROOT, "tasks", "main.py"), "--task", "WIKITEXT103",
                      "--valid-data", str(wiki), "--load", str(root), "--use-checkpoint-args",
                      "--micro-batch-size", "1", "--overlapping-eval", "8",
                      "--results-path", str(tmp_path / "results.json")],
                     timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert (tmp_path / "results.json").is_file()
