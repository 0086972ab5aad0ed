"""The allow-list for what Megatron-LM pickles into its checkpoints, read without importing Megatron.

A Megatron-LM `torch` rank file and a Megatron-Core torch_dist `common.pt` hold, besides tensors
and plain data, the run's `args` as an `argparse.Namespace` whose values include Megatron's own
classes. Checked against Megatron core_v0.16.1's training loop, the globals such a file names are:

    argparse.Namespace, types.SimpleNamespace, pathlib.PosixPath      (args, paths)
    signal.Signals                                                     (--exit-signal)
    numpy's array reconstruction: ndarray, dtype, UInt32DType, ...     (numpy RNG state arrays)
    io.BytesIO                                                         (Transformer Engine extra state)
    megatron.core.enums.ModelType, Fp8Recipe, Fp4Recipe
    megatron.core.transformer.enums.AttnBackend, CudaGraphScope, ...   (enum-typed flags)
    megatron.core.rerun_state_machine.RerunMode, RerunState, RerunDiagnostic
    megatron.core.optimizer.OptimizerConfig                            (a dataclass of flags)

`safe_globals()` lists these for `torch.load(weights_only=True)`: the Python and numpy classes are
the real ones (building them runs no code from the file), each Megatron name is mapped to a
stand-in defined here (`MegatronEnum` for enums: the member's name and value; `MegatronRecord`
for a dataclass: its fields), so Megatron is never imported and no other global resolves: a file
naming anything else is refused by PyTorch's weights-only unpickler.
"""

from __future__ import annotations

import argparse
import io
import pathlib
import signal
import types
from typing import Any

import numpy as np

__all__ = ["MegatronEnum", "MegatronRecord", "safe_globals", "MEGATRON_ENUMS", "MEGATRON_RECORDS"]


class MegatronEnum:
    """A member of one of Megatron's enums, as read from a checkpoint: `str()` is `Class.member`."""

    __slots__ = ("enum", "name", "value")

    def __init__(self, enum: str, name: str, value: Any) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __str__(self) -> str:
        return f"{self.enum}.{self.name}"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MegatronEnum) and (self.enum, self.value) == (other.enum, other.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def to_plain(self) -> str:
        return str(self)


class MegatronRecord:
    """An instance of one of Megatron's dataclasses, as read from a checkpoint: its fields only."""

    def __init__(self, *args: Any) -> None:
        del args
        self.fields: dict = {}

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (__dict__, __slots__ values)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict):
            raise TypeError(f"{type(self).__name__}: unexpected pickled state {type(state).__name__}")
        self.fields = dict(state)

    def to_plain(self) -> dict:
        return dict(self.fields)


# Megatron's enums that appear in its checkpoints: {module.Class: {value: member name}}.
MEGATRON_ENUMS: dict[str, dict] = {
    "megatron.core.enums.ModelType": {1: "encoder_or_decoder", 2: "encoder_and_decoder", 3: "retro_encoder",
                                      4: "retro_decoder"},
    "megatron.core.transformer.enums.ModelType": {1: "encoder_or_decoder", 2: "encoder_and_decoder",
                                                  3: "retro_encoder", 4: "retro_decoder"},
    "megatron.core.enums.Fp8Recipe": {v: v for v in ("delayed", "tensorwise", "mxfp8", "blockwise", "custom")},
    "megatron.core.enums.Fp4Recipe": {v: v for v in ("nvfp4", "custom")},
    "megatron.core.transformer.enums.AttnBackend": {1: "flash", 2: "fused", 3: "unfused", 4: "local", 5: "auto"},
    "megatron.core.transformer.enums.CudaGraphScope": {1: "full_iteration", 2: "attn", 3: "mlp", 4: "moe",
                                                       5: "moe_router", 6: "moe_preprocess", 7: "mamba"},
    "megatron.core.transformer.enums.AttnMaskType": {1: "padding", 2: "causal", 3: "no_mask",
                                                     4: "padding_causal", 5: "arbitrary", 6: "causal_bottom_right"},
    "megatron.core.transformer.enums.LayerType": {1: "encoder", 2: "decoder", 3: "retro_encoder",
                                                  4: "retro_decoder", 5: "retro_decoder_with_retriever"},
    "megatron.core.rerun_state_machine.RerunMode": {v: v for v in ("disabled", "validate_results",
                                                                   "report_determinism_stats")},
    "megatron.core.rerun_state_machine.RerunState": {0: "NOT_RUNNING_YET", 1: "INITIAL_RUN",
                                                     2: "RERUNNING_IN_PLACE", 3: "WILL_RERUN_FROM_CHECKPOINT",
                                                     4: "RERUNNING_FROM_CHECKPOINT",
                                                     5: "RERUNNING_AGAIN_FROM_CHECKPOINT"},
    "megatron.core.rerun_state_machine.RerunDiagnostic": {v: v for v in ("correct_result", "transient_error",
                                                                         "persistent_error")},
    "megatron.training.enums.ModelType": {1: "encoder_or_decoder", 2: "encoder_and_decoder"},
    "megatron.model.enums.ModelType": {1: "encoder_or_decoder", 2: "encoder_and_decoder"},
}

# Megatron's dataclasses that appear in its checkpoints (their fields are kept as a dict).
MEGATRON_RECORDS = ("megatron.core.optimizer.OptimizerConfig", "megatron.core.optimizer.optimizer_config.OptimizerConfig")


def _enum_stand_in(qualified: str):
    enum_name = qualified.rsplit(".", 1)[1]
    members = MEGATRON_ENUMS[qualified]

    def member(value: Any) -> MegatronEnum:
        if value not in members:
            raise ValueError(f"{qualified} has no member with value {value!r}")
        return MegatronEnum(enum_name, members[value], value)

    member.__qualname__ = member.__name__ = f"stand_in_{enum_name}"
    return member


def _record_stand_in(qualified: str) -> type:
    return type(f"StandIn{qualified.rsplit('.', 1)[1]}", (MegatronRecord,), {"__module__": __name__})


def _numpy_globals() -> list:
    """numpy's array/dtype reconstruction under both the numpy 1.x and 2.x module names."""
    from numpy import dtypes

    reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
    found: list = [(reconstruct, "numpy.core.multiarray._reconstruct"),
                   (reconstruct, "numpy._core.multiarray._reconstruct"), np.ndarray, np.dtype]
    for name in ("UInt8DType", "UInt16DType", "UInt32DType", "UInt64DType", "Int8DType", "Int16DType", "Int32DType",
                 "Int64DType", "Float16DType", "Float32DType", "Float64DType", "BoolDType"):
        if hasattr(dtypes, name):
            found.append(getattr(dtypes, name))
    return found


_GLOBALS: list = []


def safe_globals() -> list:
    """What `torch.serialization.safe_globals` gets for a Megatron-LM file (see the module doc)."""
    if not _GLOBALS:
        _GLOBALS.extend([argparse.Namespace, types.SimpleNamespace, io.BytesIO, signal.Signals,
                         (pathlib.PurePosixPath, "pathlib.PosixPath"), (pathlib.PurePosixPath, "pathlib.PurePosixPath"),
                         *_numpy_globals()])
        _GLOBALS.extend((_enum_stand_in(name), name) for name in MEGATRON_ENUMS)
        _GLOBALS.extend((_record_stand_in(name), name) for name in MEGATRON_RECORDS)
    return list(_GLOBALS)


_PEEK_BYTES = 64 << 20


def pickle_program(path: str) -> bytes:
    """The pickle program of a torch.save file without running it: `data.pkl` of the zip format,
    or the first bytes of the older (pre-PyTorch-1.6) format. Empty if the file cannot be read."""
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
                if not names:
                    return b""
                with archive.open(names[0]) as handle:
                    return handle.read(_PEEK_BYTES)
        with open(path, "rb") as handle:
            return handle.read(_PEEK_BYTES)
    except (OSError, zipfile.BadZipFile):
        return b""


def written_by_megatron(path: str) -> bool:
    """The torch.save file at `path` stores its args as an argparse.Namespace, as Megatron-LM's
    checkpoints do (ours store a plain dict). Looks at the pickle program only."""
    program = pickle_program(path)
    return b"argparse\nNamespace" in program or (b"argparse" in program and b"Namespace" in program)


def _pickled_string(text: str) -> tuple[bytes, ...]:
    """The encodings of the string `text` in a pickle program (protocol 2 BINUNICODE, protocol 4
    SHORT_BINUNICODE): a whole string, not a part of a longer one."""
    data = text.encode("utf-8")
    return (b"X" + len(data).to_bytes(4, "little") + data, b"\x8c" + bytes([len(data)]) + data)


def holds_legacy_names(path: str) -> bool:
    """The torch.save file at `path` holds a pre-Megatron-Core model: its state dict has the key
    `language_model` (a flag such as `language_model_type` in the args does not count)."""
    program = pickle_program(path)
    return any(encoded in program for encoded in _pickled_string("language_model"))


def holds_name(path: str, name: str) -> bool:
    """The torch.save file at `path` holds the string `name` whole (a state dict key, say) in the
    first part of its pickle program, which the state dict's keys are part of."""
    program = pickle_program(path)
    return any(encoded in program for encoded in _pickled_string(name))
