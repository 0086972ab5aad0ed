"""Conversion's side of Megatron's checkpoints: full tensors <-> the conversion messages.

Reading goes through the checkpoint-format registry (gigatron/core/checkpoint/formats.py), which
detects the format of a directory (`torch` at any tensor/pipeline/expert layout, `torch_dist`) and
returns the model as full tensors; `read_torch_checkpoint` adds the conversion metadata and cuts
the vocabulary to its true size. Writing shards full tensors for a target layout and hands each
rank's state dict to the `torch` layout's writer (gigatron/core/checkpoint/torch_layout.py: one
file per rank, each atomically, then the checksum manifest and the tracker last), so an
interrupted conversion never looks complete.

Files written here load with the training engine's `--load` (weights; optimizer and RNG state are
absent, so a `release` checkpoint starts at iteration 0 and an `iter_*` one needs --no-load-optim
--no-load-rng or --finetune), and `--use-checkpoint-args` takes the model flags from `args`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from gigatron.core.checkpoint import formats as checkpoint_formats
from gigatron.core.checkpoint import torch_layout
from gigatron.core.checkpoint.header import CHECKPOINT_VERSION, checkpoint_header
from gigatron.core.checkpoint.io import CheckpointError
from gigatron.core.checkpoint.paths import TRACKER_FILENAME, resolve_checkpoint_dir
from gigatron.core.checkpoint.state import ModelState
from gigatron.core.checkpoint.tp_layout import VOCAB_PARAMS, compact, mamba_segments, pad_vocab, split_for_tp
from gigatron.core.convert.protocol import (
    MAMBA_FLAGS,
    MAMBA_MODEL,
    MODEL_FLAGS,
    MOE_FLAGS,
    TOKENIZER_FLAGS,
    model_metadata_from_args,
    ConversionError,
    Message,
    MessageReader,
    dtype_name,
    transformer_config_from_metadata,
)

__all__ = [
    "CHECKPOINT_VERSION",
    "TRACKER_FILENAME",
    "MODEL_FILENAME",
    "TOKENIZER_DIRNAME",
    "resolve_checkpoint_dir",
    "read_torch_checkpoint",
    "model_state_to_metadata",
    "torch_checkpoint_messages",
    "true_vocab_size_of",
    "metadata_from_args",
    "save_torch_checkpoint",
    "rank_state_dicts",
    "args_for_target",
    "split_for_ep",
    "copy_tokenizer_files",
    "tokenizer_flags_for_dir",
    "holds_mamba_model",
]

MODEL_FILENAME = torch_layout.MODEL_FILENAME
TOKENIZER_DIRNAME = "tokenizer"

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")

# Files that make up a tokenizer, copied next to a converted checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")


def _check_expert_tensors(state: ModelState) -> None:
    """The conversion messages carry experts one by one (SequentialMLP names). Every reader of the
    registry gives them so (torch_dist stores GroupedMLP experts per expert; the torch layout's reader
    refuses GroupedMLP files), so grouped weights here mean a reader that does not split them."""
    grouped = sorted(name for name in state.tensors if re.search(r"\.experts\.weight[12]$", name))
    if grouped:
        raise ConversionError(f"{state.path} stores experts as GroupedMLP weight1/weight2 ({grouped[0]}, ...); only "
                              "per-expert weights (mlp.experts.local_experts.*) are converted: save it without "
                              "--moe-grouped-gemm first")


# ------------------------------------------------------------------ reading


def true_vocab_size_of(args: dict, padded: int, override: Optional[int]) -> int:
    """The true vocabulary: `override`, else the saved true size, else the tokenizer's, else `padded`."""
    if override is not None:
        return int(override)
    if args.get("true_vocab_size"):
        return int(args["true_vocab_size"])
    if args.get("tokenizer_type"):
        from gigatron.core.tokenizers import build_tokenizer

        try:
            return int(build_tokenizer(argparse.Namespace(**args)).vocab_size)
        except (OSError, ValueError) as exc:
            raise ConversionError(
                f"cannot build the checkpoint's tokenizer ({args.get('tokenizer_type')}) to find the true vocabulary "
                f"size: {exc}. Pass --true-vocab-size (or fix the tokenizer paths).") from exc
    return padded


def metadata_from_args(args: dict, true_vocab_size: int, iteration: Optional[int], params_dtype: torch.dtype,
                       mamba: bool = False) -> dict:
    """The conversion metadata of a checkpoint saved with the flags `args` (the model, MoE, Mamba and
    tokenizer flags derived from the config dataclasses: protocol.model_metadata_from_args).
    `mamba`: the checkpoint holds a Mamba / hybrid model (MambaModel)."""
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if args.get(name) is None:
            raise ConversionError(f"the checkpoint's args lack {name}; it was not saved by Gigatron or Megatron")
    md = model_metadata_from_args(args, mamba=mamba)
    md.update(
        true_vocab_size=true_vocab_size,
        tokenizer_dir=None,
        params_dtype=dtype_name(params_dtype),
        iteration=iteration,
        consumed_train_samples=int(args.get("consumed_train_samples") or 0),
        consumed_valid_samples=int(args.get("consumed_valid_samples") or 0),
        hf_config=args.get("hf_config"),
    )
    return md


def read_torch_checkpoint(path: str, true_vocab_size: Optional[int] = None,
                          allow_pickle: bool = False) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read a checkpoint of any registered format — `torch` saved at any tp/pp/ep (virtual stages
    too), or torch_dist — as (metadata, {global name: full tensor}). `path`: a save directory with a
    tracker file, or an iteration directory. `allow_pickle` also accepts Megatron-LM's own files,
    whose args are an argparse.Namespace (still a weights-only load: no other object is built);
    their Transformer Engine norm names are mapped too."""
    return model_state_to_metadata(checkpoint_formats.read_model(path, allow_namespace=allow_pickle), true_vocab_size)


def model_state_to_metadata(state: ModelState, true_vocab_size: Optional[int] = None
                            ) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(conversion metadata, tensors) of a model read from a checkpoint: the vocabulary cut to its
    true size (explicit size, saved true size, else the tokenizer's) and a tied output layer left out."""
    args = state.args
    if not args:
        raise CheckpointError(f"{state.path} holds no model flags (args); it cannot be converted without knowing "
                              "the model shape")
    _check_expert_tensors(state)
    if any(name.startswith("encoder.") for name in state.tensors):  # Megatron-Core's BertModel / T5Model
        kind = "T5" if any(name.startswith("decoder.") for name in state.tensors) else "BERT"
        raise ConversionError(f"{state.path} holds a {kind} model, not a GPT: convert it with convert.py --model-type "
                              f"{kind} --loader core --saver megatron_dist or megatron_torch (from_pretrained loads "
                              "GPT models)")
    tensors = dict(state.tensors)
    stored_rows = tensors["embedding.word_embeddings.weight"].shape[0]
    vocab = true_vocab_size_of(args, stored_rows, true_vocab_size)
    if vocab > stored_rows:
        raise ConversionError(f"true vocabulary size {vocab} exceeds the {stored_rows} rows stored in {state.path}")
    if not args.get("untie_embeddings_and_output_weights"):
        tensors.pop("output_layer.weight", None)
    for name in VOCAB_PARAMS:
        if name in tensors:
            tensors[name] = tensors[name][:vocab].contiguous()
    return metadata_from_args(args, vocab, state.iteration, state.dtype, mamba=holds_mamba_model(tensors)), tensors


def holds_mamba_model(tensors) -> bool:
    """Whether full tensors (or their names) are a MambaModel's: its stack ends in decoder.final_norm
    (a GPTModel's in decoder.final_layernorm) and its Mamba layers hold mixer.* tensors."""
    return any(name.startswith("decoder.final_norm.") or ".mixer." in name for name in tensors)


def torch_checkpoint_messages(path: str, true_vocab_size: Optional[int] = None,
                              allow_pickle: bool = False) -> Iterator[Message]:
    """The conversion messages of a `torch`-format checkpoint (see `read_torch_checkpoint`)."""
    from gigatron.core.convert.protocol import state_to_messages

    md, tensors = read_torch_checkpoint(path, true_vocab_size, allow_pickle)
    yield from state_to_messages(md, tensors)


# ------------------------------------------------------------------ tokenizer files


def copy_tokenizer_files(md: dict, dest: str) -> dict:
    """Copy the tokenizer files named by the metadata into `dest`; return the tokenizer flags
    pointing at the copies (absolute paths). Sources: `md['tokenizer_dir']` (a folder of
    tokenizer files) or the existing `vocab_file`, `merge_file`, `tokenizer_model` paths."""
    flags = {k: md.get(k) for k in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")}
    dest = os.path.abspath(dest)
    copied = False
    source_dir = md.get("tokenizer_dir")
    if source_dir and os.path.isdir(source_dir):
        for name in TOKENIZER_FILES:
            src = os.path.join(source_dir, name)
            if os.path.isfile(src):
                _copy(src, os.path.join(dest, name))
                copied = True
        if copied:
            flags.update(tokenizer_flags_for_dir(dest, md))
        return flags
    for key in ("vocab_file", "merge_file", "tokenizer_model"):
        src = md.get(key)
        if not src:
            continue
        if os.path.isdir(src):
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(src, name)):
                    _copy(os.path.join(src, name), os.path.join(dest, name))
            flags[key] = dest
        elif os.path.isfile(src):
            target = os.path.join(dest, os.path.basename(src))
            _copy(src, target)
            flags[key] = target
        else:
            print(f"WARNING: tokenizer file {src} ({key}) does not exist; it is not copied", flush=True)
    return flags


def _copy(src: str, dst: str) -> None:
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = dst + ".tmp"
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def tokenizer_flags_for_dir(folder: str, md: dict) -> dict:
    """Tokenizer flags for a folder of HuggingFace tokenizer files: GPT2BPETokenizer for GPT-2's
    vocab.json + merges.txt, HuggingFaceTokenizer for a tokenizer.json, Llama2Tokenizer for a
    SentencePiece tokenizer.model; NullTokenizer over the true vocabulary when there is none."""
    folder = os.path.abspath(folder)
    has = {name: os.path.isfile(os.path.join(folder, name)) for name in TOKENIZER_FILES}
    flags = dict(tokenizer_type=None, vocab_file=None, merge_file=None, tokenizer_model=None, vocab_size=None)
    family = (md.get("hf_config") or {}).get("model_type")
    if family == "gpt2" and has["vocab.json"] and has["merges.txt"]:
        flags.update(tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(folder, "vocab.json"),
                     merge_file=os.path.join(folder, "merges.txt"))
    elif family == "bert" and has["vocab.txt"]:
        # BERT WordPiece: lower-cased unless tokenizer_config.json says do_lower_case false.
        lower = True
        if has["tokenizer_config.json"]:
            with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as handle:
                lower = bool(json.load(handle).get("do_lower_case", True))
        flags.update(tokenizer_type="BertWordPieceLowerCase" if lower else "BertWordPieceCase",
                     vocab_file=os.path.join(folder, "vocab.txt"))
    elif has["tokenizer.json"]:
        flags.update(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=folder)
    elif has["tokenizer.model"]:
        flags.update(tokenizer_type="Llama2Tokenizer", tokenizer_model=os.path.join(folder, "tokenizer.model"))
    else:
        # Token ids 0..V-2 plus end-of-document V-1: the NullTokenizer's vocabulary equals the model's.
        flags.update(tokenizer_type="NullTokenizer", vocab_size=int(md["true_vocab_size"]) - 1)
    return flags


# ------------------------------------------------------------------ writing


def _stage_layout(md: dict, tp: int, pp: int) -> List[Tuple[int, int]]:
    """[(first global layer, number of layers)] per pipeline rank at the target layout."""
    from gigatron.core.transformer.block import layer_offset, num_layers_on_stage

    config = transformer_config_from_metadata(md, tp, pp, perform_initialization=False)
    return [(layer_offset(config, r, pp), num_layers_on_stage(config, r, pp)) for r in range(pp)]


def args_for_target(md: dict, tp: int, pp: int, padded: int, tokenizer_flags: dict, ep: int = 1) -> dict:
    args = {name: md.get(name) for name in MODEL_FLAGS}
    args.update({name: md[name] for name in TOKENIZER_FLAGS if name in md})
    if md.get(MAMBA_MODEL):
        args.update({name: md.get(name) for name in MAMBA_FLAGS})
    if md.get("num_experts"):
        args.update({name: md.get(name) for name in MOE_FLAGS})
        # MoE layers at tensor-parallel size > 1 need sequence parallelism (validate_moe).
        args.update(moe_grouped_gemm=False, expert_tensor_parallel_size=None, sequence_parallel=tp > 1)
    dtype = md.get("params_dtype", "float32")
    args.update(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=None,
        expert_model_parallel_size=ep,
        padded_vocab_size=padded,
        true_vocab_size=int(md["true_vocab_size"]),
        make_vocab_size_divisible_by=int(md["make_vocab_size_divisible_by"]),
        bf16=dtype == "bfloat16",
        fp16=dtype == "float16",
        consumed_train_samples=int(md.get("consumed_train_samples") or 0),
        consumed_valid_samples=int(md.get("consumed_valid_samples") or 0),
        hf_config=md.get("hf_config"),
    )
    args.update(tokenizer_flags)
    return args


def _shard_stage(tensors: Dict[str, torch.Tensor], first_layer: int, num_layers: int, tp: int, swiglu: bool,
                 padded: int, md: Optional[dict] = None) -> List[Dict[str, torch.Tensor]]:
    """Per-tp-rank state dicts (local layer numbers) of one pipeline stage. `md`: the flags that
    size tensors split segment by segment (a Mamba mixer's; see tp_layout.mamba_segments)."""
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(tp)]
    for name, full in tensors.items():
        match = _LAYER.match(name)
        if match:
            local = int(match.group(1)) - first_layer
            if not 0 <= local < num_layers:
                continue
            local_name = f"decoder.layers.{local}.{match.group(2)}"
        else:
            local_name = name
        if name in VOCAB_PARAMS:
            full = pad_vocab(full, padded)
        segments = mamba_segments(name, md or {}) if tp > 1 else None
        for rank, shard in enumerate(split_for_tp(name, full, tp, swiglu, segments)):
            out[rank][local_name] = compact(shard)
    return out


def rank_state_dicts(md: dict, tensors: Dict[str, torch.Tensor], tp: int = 1, pp: int = 1,
                     padded_vocab_size: Optional[int] = None) -> Dict[Tuple[int, int], Dict[str, torch.Tensor]]:
    """{(tp_rank, pp_rank): the state dict of that rank's GPTModel stage} for full tensors."""
    from gigatron.core.tokenizers import vocab_size_with_padding

    padded = padded_vocab_size or vocab_size_with_padding(int(md["true_vocab_size"]),
                                                          md["make_vocab_size_divisible_by"], tp)
    stages = _stage_layout(md, tp, pp)
    tied = not md["untie_embeddings_and_output_weights"]
    out = {}
    for pp_rank, (first, count) in enumerate(stages):
        stage = {k: v for k, v in tensors.items()
                 if not k.startswith("embedding.") or pp_rank == 0}
        stage = {k: v for k, v in stage.items()
                 if not k.startswith(("decoder.final_layernorm", "decoder.final_norm.", "mtp."))
                 and k != "output_layer.weight" or pp_rank == pp - 1}
        if pp_rank == pp - 1 and tied and pp > 1:
            stage["output_layer.weight"] = tensors["embedding.word_embeddings.weight"]
        if pp_rank == pp - 1 and md.get("mtp_num_layers") and pp > 1:
            # the multi-token prediction blocks' copy of the word embedding on the last stage
            stage["embedding.word_embeddings.weight"] = tensors["embedding.word_embeddings.weight"]
        for tp_rank, state in enumerate(_shard_stage(stage, first, count, tp, bool(md["swiglu"]), padded, md)):
            out[(tp_rank, pp_rank)] = state
    return out


def split_for_ep(state: Dict[str, torch.Tensor], ep: int, num_experts: int) -> List[Dict[str, torch.Tensor]]:
    """The per-expert-parallel-rank state dicts of one (tp, pp) rank's state dict that holds all
    experts: rank e keeps experts e*G .. (e+1)*G-1 (G = num_experts / ep), renumbered 0..G-1, and
    every non-expert tensor."""
    if ep == 1:
        return [state]
    local = num_experts // ep
    out: List[Dict[str, torch.Tensor]] = [{} for _ in range(ep)]
    for name, tensor in state.items():
        match = _LAYER.match(name)
        expert = _EXPERT.match(match.group(2)) if match else None
        if expert is None:
            for rank_state in out:
                rank_state[name] = tensor
            continue
        j = int(expert.group(1))
        out[j // local][f"decoder.layers.{match.group(1)}.mlp.experts.local_experts.{j % local}.{expert.group(2)}"] = \
            tensor
    return out


def save_torch_checkpoint(messages: Iterable[Message], save_dir: str, target_tp: int = 1, target_pp: int = 1,
                          checking: bool = True, make_vocab_size_divisible_by: Optional[int] = None,
                          params_dtype: Optional[torch.dtype] = None, target_ep: int = 1,
                          file_content: Optional[Callable[[dict, dict, dict], dict]] = None) -> str:
    """Write the model of a message stream as a `torch`-format checkpoint at (target_tp, target_pp),
    and for a mixture-of-experts model at expert-parallel size target_ep (each expert-parallel
    rank's files hold num_experts / target_ep experts; experts are split over the tensor-parallel
    ranks like the dense MLP).

    Stages are written as soon as their layers have arrived. The tokenizer files named by the
    metadata are copied to `<save_dir>/tokenizer` and `args` points at them. `file_content(header,
    state_dict, metadata)` builds a rank file's content (default: the header plus `model`; the
    legacy saver gives Megatron's pre-Megatron-Core layout). Returns the iteration directory."""
    reader = MessageReader(messages, checking)
    md = dict(reader.md)
    if make_vocab_size_divisible_by is not None:
        md["make_vocab_size_divisible_by"] = int(make_vocab_size_divisible_by)
    if params_dtype is not None:
        md["params_dtype"] = dtype_name(params_dtype)
    stages = _stage_layout(md, target_tp, target_pp)  # validates the sizes before any work
    num_experts = int(md.get("num_experts") or 0)
    if target_ep < 1:
        raise ValueError(f"--target-expert-parallel-size must be >= 1, got {target_ep}")
    if target_ep > 1 and (not num_experts or num_experts % target_ep != 0):
        raise ValueError(f"--target-expert-parallel-size {target_ep} must divide the number of experts "
                         f"({num_experts or 'none: a dense model needs 1'})")
    expert_ffn = int(md.get("moe_ffn_hidden_size") or md.get("ffn_hidden_size") or 0)
    if num_experts and expert_ffn % target_tp != 0:
        raise ValueError(f"the experts' ffn hidden size {expert_ffn} does not split over "
                         f"--target-tensor-parallel-size {target_tp} (experts are split like the dense MLP)")
    from gigatron.core.tokenizers import vocab_size_with_padding

    padded = vocab_size_with_padding(int(md["true_vocab_size"]), md["make_vocab_size_divisible_by"], target_tp)
    iteration = md.get("iteration")
    iter_dir = os.path.join(save_dir, "release" if iteration is None else f"iter_{int(iteration):07d}")
    if torch_layout.rank_dirs(iter_dir):
        raise ValueError(f"{iter_dir} already holds a checkpoint; its files would mix with the new layout's. "
                         "Choose an empty --save-dir or remove it first")
    os.makedirs(save_dir, exist_ok=True)
    tokenizer_flags = copy_tokenizer_files(md, os.path.join(save_dir, TOKENIZER_DIRNAME))
    args = args_for_target(md, target_tp, target_pp, padded, tokenizer_flags, target_ep)
    swiglu = bool(md["swiglu"])
    tied = not md["untie_embeddings_and_output_weights"]
    mtp = bool(md.get("mtp_num_layers"))  # the last stage keeps a copy of the word embedding
    dtype = None if params_dtype is None else params_dtype
    header = checkpoint_header(args, iteration, consumed_train_samples=args["consumed_train_samples"],
                               consumed_valid_samples=args["consumed_valid_samples"])
    records: Dict[str, dict] = {}

    def write_stage(pp_rank: int, tensors: Dict[str, torch.Tensor]) -> None:
        first, count = stages[pp_rank]
        stage = dict(tensors)
        last = pp_rank == target_pp - 1
        if pp_rank != 0:
            if not (last and mtp):
                stage.pop("embedding.word_embeddings.weight", None)
            stage.pop("embedding.position_embeddings.weight", None)
        if last and tied and target_pp > 1:
            stage["output_layer.weight"] = tensors["embedding.word_embeddings.weight"]
        if dtype is not None:
            stage = {k: v.to(dtype) for k, v in stage.items()}
        for tp_rank, tp_state in enumerate(_shard_stage(stage, first, count, target_tp, swiglu, padded, md)):
            for ep_rank, state_dict in enumerate(split_for_ep(tp_state, target_ep, num_experts)):
                relative = os.path.join(torch_layout.rank_dir_name(tp_rank, pp_rank, target_pp, ep_rank, target_ep),
                                        torch_layout.MODEL_FILENAME)
                content = (dict(header, model=state_dict) if file_content is None
                           else file_content(header, state_dict, md))
                name, record = torch_layout.write_rank_file(iter_dir, relative, content)
                records[name] = record

    buffer: Dict[str, torch.Tensor] = {}
    stage = 0
    for name, payload in reader:
        buffer.update(payload)
        while stage < target_pp - 1 and _stage_complete(buffer, stages[stage]):
            write_stage(stage, buffer)
            keep = {"embedding.word_embeddings.weight"} if tied or mtp else set()
            first, count = stages[stage]
            buffer = {k: v for k, v in buffer.items() if k in keep or _layer_of(k) is not None
                      and _layer_of(k) >= first + count}
            stage += 1
    write_stage(target_pp - 1, buffer)
    torch_layout.finish_save(save_dir, iter_dir, iteration, records)
    return iter_dir


def _layer_of(name: str) -> Optional[int]:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _stage_complete(buffer: Dict[str, torch.Tensor], stage: Tuple[int, int]) -> bool:
    # Messages carry whole layers, so the stage is complete once its last layer has arrived.
    first, count = stage
    return count > 0 and any(_layer_of(k) == first + count - 1 for k in buffer)
