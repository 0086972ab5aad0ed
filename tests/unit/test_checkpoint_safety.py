"""Loading a checkpoint never runs code from it: a torch_dist `.metadata` that carries a pickled
payload is refused, with and without a matching CRC in metadata.json, by every entry point that
opens checkpoints (training load, --use-checkpoint-args, from_pretrained, convert.py, the
generation tools, the tasks); the payload's marker file never appears."""

import json
import os
import pickle
import sys
import zlib

import pytest
import torch

import gigatron
from gigatron.core.checkpoint.dist import read_dcp_metadata
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from script_server import run_python  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VOCAB = 63  # NullTokenizer: ids 0..62 plus end-of-document
FLAGS = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
         "--max-position-embeddings", "8", "--micro-batch-size", "2", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", str(VOCAB), "--make-vocab-size-divisible-by", "32", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--use-cpu-initialization", "--distributed-backend", "gloo"]


class _Payload:
    """Unpickling this creates the directory `marker` (what an attacker's code would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def _model():
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                               max_position_embeddings=8, attention_dropout=0.0, hidden_dropout=0.0,
                               use_cpu_initialization=True)
    return GPTModel(config, ParallelGroups.single(), 64, seed=3)


def _save(root):
    from gigatron.training.arguments import parse_args
    from gigatron.training.checkpointing import save_checkpoint

    args = parse_args(FLAGS)
    save_checkpoint(str(root), 2, [_model()], None, None, args, ParallelGroups.single(), save_optim=False,
                    save_rng=False, ckpt_format="torch_dist")
    return root / "iter_0000002"


def _poison(iter_dir, marker, matching_crc):
    """Replace .metadata with a payload; with `matching_crc` metadata.json is updated to match it."""
    data = pickle.dumps(_Payload(marker))
    (iter_dir / ".metadata").write_bytes(data)
    if matching_crc:
        record = json.loads((iter_dir / "metadata.json").read_text())
        record["files"][".metadata"] = {"size": len(data), "crc32": zlib.crc32(data) & 0xFFFFFFFF}
        (iter_dir / "metadata.json").write_text(json.dumps(record))


@pytest.fixture(params=[True, False], ids=["matching-crc", "stale-crc"])
def poisoned(request, tmp_path):
    marker = tmp_path / "PWNED"
    iter_dir = _save(tmp_path / "ckpt")
    _poison(iter_dir, marker, request.param)
    yield tmp_path / "ckpt", marker
    assert not marker.exists(), "the checkpoint's payload ran"


def _refused(message):
    assert ".metadata" in message
    assert "refused" in message or "damaged" in message


def test_benign_metadata_reads_with_the_allow_list(tmp_path):
    iter_dir = _save(tmp_path / "ckpt")
    with open(iter_dir / ".metadata", "rb") as handle:
        reference = pickle.load(handle)  # the plain unpickler, on a file we wrote ourselves
    ours = read_dcp_metadata(str(iter_dir))
    assert ours.state_dict_metadata.keys() == reference.state_dict_metadata.keys()
    key = "embedding.word_embeddings.weight"
    assert ours.state_dict_metadata[key].size == reference.state_dict_metadata[key].size
    assert ours.state_dict_metadata[key].properties.dtype == torch.float32
    assert {k.fqn for k in ours.storage_data} == {k.fqn for k in reference.storage_data}


def test_training_load_refuses(poisoned):
    from gigatron.training.checkpointing import load_checkpoint

    root, _ = poisoned
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(root), [_model()], None, None, ParallelGroups.single(), load_optim=False, load_rng=False)
    _refused(str(info.value))


def test_pretrain_gpt_load_refuses(poisoned, tmp_path):
    root, _ = poisoned
    out = _run_tool([os.path.join(ROOT, "pretrain_gpt.py"), *FLAGS, "--global-batch-size", "2", "--train-iters", "1",
                     "--mock-data", "--lr", "1e-3", "--load", str(root), "--ckpt-format", "torch_dist",
                     "--data-cache-path", str(tmp_path / "cache"), "--eval-iters", "0"])
    assert out.returncode != 0
    _refused(out.stderr)


def test_use_checkpoint_args_then_load_refuses(poisoned):
    from gigatron.training.arguments import parse_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint

    root, _ = poisoned
    args = parse_args(FLAGS + ["--load", str(root), "--use-checkpoint-args"])
    load_args_from_checkpoint(args)  # reads common.pt only, checked against metadata.json
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(root), [_model()], None, None, ParallelGroups.single(), finetune=True)
    _refused(str(info.value))


def test_from_pretrained_refuses(poisoned):
    root, _ = poisoned
    with pytest.raises(CheckpointError) as info:
        gigatron.from_pretrained(root)
    _refused(str(info.value))


def test_convert_refuses(poisoned, tmp_path):
    root, _ = poisoned
    out = run_python([os.path.join(ROOT, "tools", "checkpoint", "convert.py"), "--model-type", "GPT",
                      "--loader", "core", "--saver", "hf", "--load-dir", str(root), "--save-dir",
                      str(tmp_path / "hf")], timeout=300, cwd=ROOT)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "Traceback" not in out.stderr
    _refused(out.stderr)


def _run_tool(args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return run_python([*args], timeout=300, cwd=ROOT, env=env)


def test_generate_text_and_server_loader_refuse(poisoned):
    """tools/generate_text.py loads through the server's build_engine_from_args."""
    root, _ = poisoned
    out = _run_tool([os.path.join(ROOT, "tools", "generate_text.py"), "--load", str(root), "--use-checkpoint-args",
                     "--vocab-size", str(VOCAB), "--prompt", "1 2", "--tokens-to-generate", "2"])
    assert out.returncode != 0
    _refused(out.stderr)


def test_tasks_refuse(poisoned, tmp_path):
    root, _ = poisoned
    wiki = tmp_path / "wiki.test.tokens"
    wiki.write_text(" ".join(str(i % 40 + 1) for i in range(30)) + " \n")
    out = _run_tool([os.path.join(ROOT, "tasks", "main.py"), *FLAGS, "--task", "WIKITEXT103", "--valid-data",
                     str(wiki), "--load", str(root)])
    assert out.returncode != 0
    _refused(out.stderr)


def test_data_file_outside_the_checkpoint_is_refused(tmp_path):
    """A .metadata that points a tensor at a file outside the directory is refused before reading."""
    iter_dir = _save(tmp_path / "ckpt")
    with open(iter_dir / ".metadata", "rb") as handle:
        metadata = pickle.load(handle)
    for info in metadata.storage_data.values():
        info.relative_path = "../../outside.distcp"
    data = pickle.dumps(metadata)
    (iter_dir / ".metadata").write_bytes(data)
    record = json.loads((iter_dir / "metadata.json").read_text())
    record["files"][".metadata"] = {"size": len(data), "crc32": zlib.crc32(data) & 0xFFFFFFFF}
    (iter_dir / "metadata.json").write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        gigatron.from_pretrained(tmp_path / "ckpt")


def test_allow_pickle_accepts_megatron_args_but_runs_no_code(tmp_path):
    """convert.py --allow-pickle reads Megatron-LM's argparse.Namespace args, still weights-only:
    a rank file carrying any other object is refused and its payload never runs."""
    import argparse

    from gigatron.core.convert.torch_format import read_torch_checkpoint

    from gigatron.training.arguments import parse_args
    from gigatron.training.checkpointing import save_checkpoint

    marker = tmp_path / "PWNED"
    root = tmp_path / "ckpt"
    args = parse_args(FLAGS)
    save_checkpoint(str(root), 2, [_model()], None, None, args, ParallelGroups.single(), save_optim=False,
                      save_rng=False, ckpt_format="torch")
    rank_file = root / "iter_0000002" / "mp_rank_00" / "model_optim_rng.pt"
    os.unlink(root / "iter_0000002" / "checksums.json")  # as Megatron writes it: no manifest
    state = torch.load(rank_file, weights_only=True)
    state["args"] = argparse.Namespace(**state["args"])
    torch.save(state, rank_file)
    md, _ = read_torch_checkpoint(str(root), allow_pickle=True)
    assert md["num_layers"] == 2
    state["args"].evil = _Payload(marker)
    torch.save(state, rank_file)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_torch_checkpoint(str(root), allow_pickle=True)
    assert not marker.exists()
