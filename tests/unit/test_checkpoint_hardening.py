"""Checksums on the `torch` layout, file permissions that follow the umask, start-up checks of
--save and --load, and a clear description of directories in a layout Gigatron does not read."""

import json
import os
import stat
import zlib

import pytest
import torch

import gigatron
from gigatron.core.checkpoint import formats
from gigatron.core.checkpoint.io import CheckpointError, CorruptCheckpointError, atomic_torch_save, atomic_write_text
from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from gigatron.training import checkpointing as C

FLAGS = ["--num-layers", "2", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "8",
         "--max-position-embeddings", "8", "--micro-batch-size", "2", "--tokenizer-type", "NullTokenizer",
         "--vocab-size", "63", "--make-vocab-size-divisible-by", "32", "--attention-dropout", "0",
         "--hidden-dropout", "0", "--use-cpu-initialization"]


def _model(seed=3):
    config = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8,
                               max_position_embeddings=8, attention_dropout=0.0, hidden_dropout=0.0,
                               use_cpu_initialization=True)
    return GPTModel(config, ParallelGroups.single(), 64, seed=seed)


def _save(root, ckpt_format="torch", iteration=4):
    from gigatron.training.arguments import parse_args

    C.save_checkpoint(str(root), iteration, [_model()], None, None, parse_args(FLAGS), ParallelGroups.single(),
                      save_optim=False, save_rng=False, ckpt_format=ckpt_format)
    return root / f"iter_{iteration:07d}"


def _flip_byte(path, offset=None):
    data = bytearray(path.read_bytes())
    offset = len(data) // 2 if offset is None else offset
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


# ------------------------------------------------------------------ checksums on the torch layout


def test_torch_layout_writes_a_checksum_manifest(tmp_path):
    iter_dir = _save(tmp_path)
    manifest = json.loads((iter_dir / "checksums.json").read_text())
    rank_file = iter_dir / "mp_rank_00" / "model_optim_rng.pt"
    data = rank_file.read_bytes()
    assert manifest["checksum"] == "crc32"
    assert manifest["files"] == {"mp_rank_00/model_optim_rng.pt": {"size": len(data),
                                                                   "crc32": zlib.crc32(data) & 0xFFFFFFFF}}


def test_flipped_byte_in_a_torch_checkpoint_is_named(tmp_path):
    iter_dir = _save(tmp_path)
    rank_file = iter_dir / "mp_rank_00" / "model_optim_rng.pt"
    # A byte inside the stored tensor data: the file still unpickles, only the checksum notices.
    _flip_byte(rank_file, len(rank_file.read_bytes()) - 2000)
    model = _model(seed=9)
    with pytest.raises(CorruptCheckpointError, match=r"checkpoint is corrupt: .*mp_rank_00/model_optim_rng.pt has "
                                                     r"CRC-32 [0-9a-f]{8}, [0-9a-f]{8} was written"):
        C.load_checkpoint(str(tmp_path), [model], None, None, ParallelGroups.single(), load_optim=False,
                          load_rng=False)
    with pytest.raises(CorruptCheckpointError, match="model_optim_rng.pt has CRC-32"):
        gigatron.from_pretrained(tmp_path)


def test_torch_checkpoint_without_a_manifest_still_loads(tmp_path):
    """Checkpoints written before the manifest (or by Megatron) load unchecked."""
    iter_dir = _save(tmp_path)
    os.unlink(iter_dir / "checksums.json")
    model = _model(seed=9)
    loaded = C.load_checkpoint(str(tmp_path), [model], None, None, ParallelGroups.single(), load_optim=False,
                               load_rng=False)
    assert loaded.iteration == 4
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _model().state_dict().values()))
    assert gigatron.from_pretrained(tmp_path).vocab_size == 64


def test_unreadable_manifest_is_named(tmp_path):
    iter_dir = _save(tmp_path)
    (iter_dir / "checksums.json").write_text("{not json")
    with pytest.raises(CorruptCheckpointError, match="checksums.json is unreadable"):
        C.load_checkpoint(str(tmp_path), [_model()], None, None, ParallelGroups.single(), load_optim=False,
                          load_rng=False)


# ------------------------------------------------------------------ permissions


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_writes_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(str(tmp_path / "a.txt"), "x")
        atomic_torch_save({"t": torch.ones(1)}, str(tmp_path / "b.pt"))
        assert _mode(tmp_path / "a.txt") == 0o644 and _mode(tmp_path / "b.pt") == 0o644
        os.umask(0o027)
        atomic_write_text(str(tmp_path / "c.txt"), "x")
        assert _mode(tmp_path / "c.txt") == 0o640
    finally:
        os.umask(old)


def test_checkpoint_files_are_not_owner_only(tmp_path, umask_022):
    torch_dir = _save(tmp_path / "torch")
    dist_dir = _save(tmp_path / "dist", ckpt_format="torch_dist")
    for path in (torch_dir / "mp_rank_00" / "model_optim_rng.pt", torch_dir / "checksums.json",
                 tmp_path / "torch" / "latest_checkpointed_iteration.txt", dist_dir / "common.pt",
                 dist_dir / "metadata.json", tmp_path / "dist" / "latest_checkpointed_iteration.txt"):
        assert _mode(path) == 0o644, path


def test_hf_export_and_loss_plot_are_not_owner_only(tmp_path, umask_022):
    from gigatron.core.convert.hf import save_hf_checkpoint
    from gigatron.core.convert.torch_format import torch_checkpoint_messages

    _save(tmp_path / "ckpt")
    save_hf_checkpoint(torch_checkpoint_messages(str(tmp_path / "ckpt")), str(tmp_path / "hf"), family="gpt2")
    for name in ("model.safetensors", "config.json"):
        assert _mode(tmp_path / "hf" / name) == 0o644, name
    pytest.importorskip("matplotlib")
    from gigatron.training.logging import write_loss_curve

    png = write_loss_curve(str(tmp_path / "loss.png"), [(1, 2.0), (2, 1.5)], [(2, 1.7)])
    assert _mode(png) == 0o644


# ------------------------------------------------------------------ start-up checks


def test_save_pointing_to_a_file_is_refused(tmp_path):
    target = tmp_path / "ckpt"
    target.write_text("not a directory")
    with pytest.raises(ValueError, match=r"--save .*ckpt is a file"):
        C.check_save_dir(str(target))
    with pytest.raises(ValueError, match=r"--save .*ckpt/run lies under .*ckpt, which is a file"):
        C.check_save_dir(str(target / "run"))
    C.check_save_dir(str(tmp_path / "new" / "run"))  # created at the first save
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_unwritable_save_dir_is_refused(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ValueError, match="cannot write in"):
            C.check_save_dir(str(locked / "ckpt"))
    finally:
        locked.chmod(0o700)


def test_save_checked_before_training_starts(tmp_path):
    from gigatron.training import gpt
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import setup

    target = tmp_path / "ckpt"
    target.write_text("")
    args = parse_args(FLAGS + ["--global-batch-size", "2", "--train-iters", "1", "--mock-data", "--save", str(target)])
    with pytest.raises(ValueError, match="is a file"):
        setup(gpt.model_provider, args)


@pytest.mark.parametrize("flags,named", [
    (dict(finetune=True), "--finetune"),
    (dict(ckpt_step=5), "--ckpt-step"),
    (dict(use_checkpoint_args=True), "--use-checkpoint-args"),
])
def test_missing_load_dir_is_an_error_when_resuming(tmp_path, flags, named):
    with pytest.raises(ValueError, match=f"--load .*missing does not exist, but {named}"):
        C.check_load_dir(str(tmp_path / "missing"), **flags)


def test_missing_load_dir_warns_prominently(tmp_path, capsys):
    C.check_load_dir(str(tmp_path / "missing"))
    C.check_load_dir(str(tmp_path / "missing"), finetune=True, pretrained_checkpoint=str(tmp_path))
    err = capsys.readouterr().err
    assert err.count(f"WARNING: no checkpoint found at {tmp_path / 'missing'}") == 2
    assert "training from scratch" in err and "!" * 40 in err
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        C.check_load_dir(str(tmp_path / "file"))


def test_empty_load_dir_warns(tmp_path, capsys):
    loaded = C.load_checkpoint(str(tmp_path), [_model()], None, None, ParallelGroups.single())
    assert loaded.path is None
    assert "no checkpoint found" in capsys.readouterr().out


# ------------------------------------------------------------------ unreadable layouts


def test_layouts_we_do_not_read_are_described(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="HuggingFace model folder.*--loader hf --saver core"):
        formats.detect_format(str(hf))
    mcore = tmp_path / "mcore"
    mcore.mkdir()
    (mcore / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                     "common_backend": "torch", "common_backend_version": 1}))
    (mcore / "common.pt").write_bytes(b"")
    (mcore / "__0_0.distcp").write_bytes(b"")
    assert formats.detect_format(str(mcore)).NAME == "megatron_torch_dist"  # read as it is
    with pytest.raises(CheckpointError, match="common.pt.*truncated or corrupt"):
        formats.read_args(str(mcore))
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "weights.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="weight files .*weights.pt"):
        gigatron.from_pretrained(loose)
    with pytest.raises(ValueError, match="--ckpt-format zarr is not supported; use one of megatron_torch_dist, torch_dist, torch"):
        formats.get_format("zarr")


def test_registry_formats_share_one_interface():
    for module in formats.FORMATS.values():
        for name in ("NAME", "detect", "read_args", "read_model", "save_training_state", "load_training_state"):
            assert hasattr(module, name), (module.__name__, name)


def test_checkpoint_package_does_not_import_convert():
    """Conversion sits above the checkpoint formats: gigatron.core.checkpoint never imports
    gigatron.core.convert (at module level or inside functions), so the two cannot form a loop."""
    import ast

    root = os.path.join(os.path.dirname(gigatron.__file__), "core", "checkpoint")
    offenders = []
    for folder, _, files in os.walk(root):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{path}:{node.lineno} {m}" for m in modules if m.startswith("gigatron.core.convert")]
    assert offenders == []
