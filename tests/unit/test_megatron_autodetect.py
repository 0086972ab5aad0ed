"""Format auto-detection: Megatron's --auto-detect-ckpt-format is accepted (a load always detects),
and a directory in a Megatron layout Gigatron does not read gets an error that says which layout
it is and what to run."""

import json
import pickle

import pytest
import torch
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

import gigatron
from gigatron.core.checkpoint import formats
from gigatron.core.checkpoint.io import CheckpointError


def test_auto_detect_ckpt_format_flag_is_accepted():
    from gigatron.training.arguments import parse_args

    args = parse_args(["--auto-detect-ckpt-format", "--num-layers", "1", "--hidden-size", "8",
                       "--num-attention-heads", "2", "--seq-length", "4", "--max-position-embeddings", "4",
                       "--micro-batch-size", "1"])
    assert args.auto_detect_ckpt_format is True


def test_megatron_zarr_backend_is_named(tmp_path):
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "zarr", "sharded_backend_version": 1}))
    (tmp_path / "common.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="zarr backend .*--ckpt-convert-format torch_dist"):
        formats.detect_format(str(tmp_path))


def test_plain_dcp_checkpoint_is_named(tmp_path):
    (tmp_path / ".metadata").write_bytes(b"")
    (tmp_path / "__0_0.distcp").write_bytes(b"")
    with pytest.raises(CheckpointError, match="(?s)incomplete.*torch_dcp or fsdp_dtensor.*--ckpt-convert-format "
                                              "torch_dist"):
        gigatron.from_pretrained(tmp_path)


def test_megatron_core_shared_experts_say_what_to_run(tmp_path):
    """A Megatron-Core torch_dist checkpoint with expert tensors Gigatron does not map (shared
    experts) is named as such, with the Megatron-LM command that gives a layout Gigatron reads."""
    size = torch.Size([2, 8, 4])
    key = "decoder.layers.mlp.shared_experts.linear_fc1.weight"
    metadata = Metadata(state_dict_metadata={key: TensorStorageMetadata(
        TensorProperties(dtype=torch.float32), size, [ChunkStorageMetadata(torch.Size([0, 0, 0]), size)])},
        storage_data={})
    (tmp_path / ".metadata").write_bytes(pickle.dumps(metadata))
    (tmp_path / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                        "common_backend": "torch", "common_backend_version": 1}))
    torch.save({"args": {"num_layers": 2}, "iteration": 1}, tmp_path / "common.pt")
    assert formats.detect_format(str(tmp_path)).NAME == "megatron_torch_dist"
    with pytest.raises(CheckpointError, match="mixture-of-experts tensors .*shared_experts.*--ckpt-convert-format torch"):
        formats.read_model(str(tmp_path))
