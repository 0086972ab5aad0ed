"""Read and write Megatron's `torch` checkpoint layout at any tensor/pipeline parallel layout.

    <dir>/latest_checkpointed_iteration.txt                   iteration number or "release"
    <dir>/iter_{N:07d}/mp_rank_{tp:02d}/model_optim_rng.pt          pipeline size 1
    <dir>/iter_{N:07d}/mp_rank_{tp:02d}_{pp:03d}/model_optim_rng.pt pipeline size > 1
    (<dir>/release/... for a model imported without training iterations)

Each file holds `model` (or `model0`, `model1`, ... per virtual pipeline stage) with the state
dict of that rank's GPTModel stage, and `args`, a plain dict of the run's flags. The reader merges
all ranks into full tensors (gigatron/core/convert/layout.py) and produces the conversion
messages; the writer shards full tensors for a target layout, writes one file per rank (each
atomically) and the tracker last, so an interrupted conversion never looks complete.

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
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import torch

from gigatron.core.checkpoint.io import CheckpointError, atomic_torch_save, atomic_write_text, safe_torch_load
from gigatron.core.convert.layout import VOCAB_PARAMS, compact, merge_from_tp, pad_vocab, split_for_tp
from gigatron.core.convert.protocol import (
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
    "torch_checkpoint_messages",
    "metadata_from_args",
    "save_torch_checkpoint",
    "rank_state_dicts",
    "split_for_ep",
    "copy_tokenizer_files",
    "tokenizer_flags_for_dir",
]

CHECKPOINT_VERSION = 3.0
TRACKER_FILENAME = "latest_checkpointed_iteration.txt"
MODEL_FILENAME = "model_optim_rng.pt"
TOKENIZER_DIRNAME = "tokenizer"

_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?(?:_(\d{3}))?$")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.+)$")

# Files that make up a tokenizer, copied next to a converted checkpoint.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt")


# ------------------------------------------------------------------ locating


def resolve_checkpoint_dir(path: str) -> Tuple[str, Optional[int]]:
    """(iteration directory, iteration or None for `release`) for a save directory with a tracker
    file or for an `iter_NNNNNNN` / `release` directory itself."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory")
    tracker = os.path.join(path, TRACKER_FILENAME)
    if os.path.isfile(tracker):
        with open(tracker, encoding="utf-8") as handle:
            text = handle.read().strip()
        if text == "release":
            return os.path.join(path, "release"), None
        try:
            iteration = int(text)
        except ValueError:
            raise CheckpointError(f"tracker file {tracker} holds {text!r}; "
                                  "expected an iteration or 'release'") from None
        return os.path.join(path, f"iter_{iteration:07d}"), iteration
    name = os.path.basename(os.path.normpath(path))
    if _rank_dirs(path) or os.path.isfile(os.path.join(path, "metadata.json")):
        match = re.fullmatch(r"iter_(\d+)", name)
        return path, (int(match.group(1)) if match else None)
    raise CheckpointError(f"{path} is neither a checkpoint directory with {TRACKER_FILENAME} nor an "
                          "iter_NNNNNNN / release directory holding mp_rank_* folders")


def _rank_dirs(iter_dir: str) -> List[str]:
    if not os.path.isdir(iter_dir):
        return []
    return sorted(d for d in os.listdir(iter_dir) if _RANK_DIR.match(d)
                  and os.path.isfile(os.path.join(iter_dir, d, MODEL_FILENAME)))


def _check_moe_args(args: dict) -> None:
    if not args.get("num_experts"):
        return
    if args.get("moe_grouped_gemm"):
        raise ConversionError("this checkpoint stores its experts as GroupedMLP weight1/weight2 (--moe-grouped-gemm); "
                              "only SequentialMLP experts (mlp.experts.local_experts.*) are converted: save it "
                              "without --moe-grouped-gemm first")
    etp = args.get("expert_tensor_parallel_size")
    tp = int(args.get("tensor_model_parallel_size") or 1)
    if etp is not None and int(etp) != tp:
        raise ConversionError(f"expert tensor-parallel size {etp} differs from the tensor-parallel size {tp}; "
                              "only checkpoints whose experts are split like the dense layers are converted")


def _parse_rank_dirs(iter_dir: str, args: dict) -> Dict[Tuple[int, int, int], str]:
    """{(tp_rank, pp_rank, ep_rank): file} for every model-parallel rank. Folder names:
    mp_rank_TT, mp_rank_TT_PPP (pipeline), mp_rank_TT_EEE (expert parallel, no pipeline),
    mp_rank_TT_PPP_EEE (both)."""
    pp_size = args.get("pipeline_model_parallel_size")  # None: the folder names tell
    ep_size = int(args.get("expert_model_parallel_size") or 1)
    _check_moe_args(args)
    files = {}
    for d in _rank_dirs(iter_dir):
        tp_s, second, third = _RANK_DIR.match(d).groups()
        if third is not None:
            if ep_size == 1:
                raise ConversionError(f"{d}: an expert-parallel rank folder, but the checkpoint's args say "
                                      "expert_model_parallel_size 1")
            pp_rank, ep_rank = int(second), int(third)
        elif second is not None and ep_size > 1 and (pp_size is None or int(pp_size) == 1):
            pp_rank, ep_rank = 0, int(second)
        elif second is not None and pp_size is not None and int(pp_size) == 1:
            raise ConversionError(f"{d}: a pipeline or expert rank folder, but the checkpoint's args say neither")
        else:
            pp_rank, ep_rank = (int(second) if second is not None else 0), 0
        files[(int(tp_s), pp_rank, ep_rank)] = os.path.join(iter_dir, d, MODEL_FILENAME)
    return files


# ------------------------------------------------------------------ reading


def _true_vocab_size(args: dict, padded: int, override: Optional[int]) -> int:
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


def metadata_from_args(args: dict, true_vocab_size: int, iteration: Optional[int], params_dtype: torch.dtype) -> dict:
    """The conversion metadata of a checkpoint saved with the flags `args` (the model, MoE and
    tokenizer flags derived from the config dataclasses: protocol.model_metadata_from_args)."""
    for name in ("num_layers", "hidden_size", "num_attention_heads"):
        if args.get(name) is None:
            raise ConversionError(f"the checkpoint's args lack {name}; it was not saved by Gigatron or Megatron")
    md = model_metadata_from_args(args)
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


def _chunk_keys(state: dict) -> List[str]:
    if "model" in state:
        return ["model"]
    keys = sorted((k for k in state if re.fullmatch(r"model\d+", k)), key=lambda k: int(k[5:]))
    if not keys:
        raise CheckpointError("checkpoint file holds no 'model' entry")
    return keys


# Megatron-LM's Transformer Engine layer spec fuses the norms into the following linear layer.
_TE_NORM_NAMES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}


def _load_file(path: str, allow_pickle: bool) -> dict:
    if allow_pickle:
        if not os.path.isfile(path):
            raise CheckpointError(f"checkpoint file {path} does not exist")
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return safe_torch_load(path)
    except CheckpointError as exc:
        if "weights-only" not in str(exc):
            raise
        raise CheckpointError(f"{exc}. A checkpoint saved by Megatron-LM itself stores its args as an argparse "
                              "Namespace: load it with --allow-pickle (only for files you trust)") from exc


def read_torch_checkpoint(path: str, true_vocab_size: Optional[int] = None,
                          allow_pickle: bool = False) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """Read a checkpoint of ours — `torch` format saved at any tp/pp (virtual stages too), or a
    torch_dist directory — and merge it:
    (metadata, {global name: full tensor}). `path`: a save directory with a tracker file, or an
    iteration directory. `allow_pickle` reads files with full unpickling (Megatron-LM's own
    checkpoints, whose args are a Namespace; their Transformer Engine norm names are mapped too)."""
    iter_dir, iteration = resolve_checkpoint_dir(path)
    from gigatron.core.checkpoint.dist import is_torch_dist_checkpoint
    if is_torch_dist_checkpoint(iter_dir):  # the parallelism-independent format: one logical copy
        from gigatron.core.checkpoint.dist_convert import read_torch_dist_model
        return read_torch_dist_model(iter_dir, true_vocab_size)
    rank_dirs = _rank_dirs(iter_dir)
    if not rank_dirs:
        raise CheckpointError(f"{iter_dir} holds no mp_rank_*/{MODEL_FILENAME} files")
    first_file = os.path.join(iter_dir, rank_dirs[0], MODEL_FILENAME)
    first = _load_file(first_file, allow_pickle)
    args = first.get("args") or {}
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if iteration is None and first.get("iteration") and os.path.basename(os.path.normpath(iter_dir)) != "release":
        iteration = int(first["iteration"])
    files = _parse_rank_dirs(iter_dir, args)
    tp_size = 1 + max(t for t, _, _ in files)
    pp_size = 1 + max(p for _, p, _ in files)
    ep_size = 1 + max(e for _, _, e in files)
    expected = {(t, p, e) for t in range(tp_size) for p in range(pp_size) for e in range(ep_size)}
    if set(files) != expected:
        missing = sorted(expected - set(files))
        raise CheckpointError(f"{iter_dir} lacks the files of (tp, pp, ep) ranks {missing}")
    num_experts = int(args.get("num_experts") or 0)
    if ep_size > 1 and (not num_experts or num_experts % ep_size != 0):
        raise CheckpointError(f"{iter_dir} has {ep_size} expert-parallel ranks but its args say num_experts "
                              f"{args.get('num_experts')}")
    local_experts = num_experts // ep_size
    states = {key: (first if f == first_file else _load_file(f, allow_pickle)) for key, f in files.items()}
    swiglu = bool(args.get("swiglu"))

    # Model chunks in global order: virtual stage first, then pipeline rank.
    num_chunks = len(_chunk_keys(states[(0, 0, 0)]))
    ordered: List[Tuple[int, str]] = [(p, key) for v in range(num_chunks)
                                      for p in range(pp_size) for key in [_chunk_keys(states[(0, p, 0)])[v]]]
    merged: Dict[str, torch.Tensor] = {}
    offset = 0
    dtype = None
    for pp_rank, key in ordered:
        local_layers = set()
        for ep_rank in range(ep_size):
            shards = [states[(t, pp_rank, ep_rank)][key] for t in range(tp_size)]
            for name in shards[0]:
                if name.endswith("._extra_state"):
                    continue
                tensor_list = [s[name] for s in shards]
                if any(not isinstance(t, torch.Tensor) for t in tensor_list):
                    continue
                match = _LAYER.match(name)
                if match:
                    local = int(match.group(1))
                    local_layers.add(local)
                    suffix = _TE_NORM_NAMES.get(match.group(2), match.group(2))
                    expert = _EXPERT.match(suffix)
                    if expert:  # local expert j of expert-parallel rank e is global expert e * G + j
                        suffix = (f"mlp.experts.local_experts.{int(expert.group(1)) + ep_rank * local_experts}."
                                  f"{expert.group(2)}")
                    elif ep_rank > 0:
                        continue  # everything but the experts is the same on every expert-parallel rank
                    global_name = f"decoder.layers.{local + offset}.{suffix}"
                elif ep_rank > 0:
                    continue
                else:
                    global_name = name
                if global_name in merged:
                    continue  # the tied output layer's copy on the last stage
                merged[global_name] = merge_from_tp(global_name, tensor_list, swiglu)
                dtype = dtype or merged[global_name].dtype
        if local_layers and sorted(local_layers) != list(range(len(local_layers))):
            raise CheckpointError(f"pipeline rank {pp_rank} ({key}) holds layers {sorted(local_layers)}; "
                                  "expected 0..n-1")
        offset += len(local_layers)
    padded = merged["embedding.word_embeddings.weight"].shape[0]
    vocab = _true_vocab_size(args, padded, true_vocab_size)
    if vocab > padded:
        raise ConversionError(f"true vocabulary size {vocab} exceeds the checkpoint's padded vocabulary {padded}")
    if not args.get("untie_embeddings_and_output_weights"):
        merged.pop("output_layer.weight", None)
    for name in VOCAB_PARAMS:
        if name in merged:
            merged[name] = merged[name][:vocab].contiguous()
    md = metadata_from_args(args, vocab, iteration, dtype or torch.float32)
    if md["num_layers"] != offset:
        raise CheckpointError(f"the checkpoint's args say {md['num_layers']} layers but its files hold {offset}")
    return md, merged


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


def _args_for(md: dict, tp: int, pp: int, padded: int, tokenizer_flags: dict, ep: int = 1) -> dict:
    args = {name: md.get(name) for name in MODEL_FLAGS}
    args.update({name: md[name] for name in TOKENIZER_FLAGS if name in md})
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
                 padded: int) -> List[Dict[str, torch.Tensor]]:
    """Per-tp-rank state dicts (local layer numbers) of one pipeline stage."""
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
        for rank, shard in enumerate(split_for_tp(name, full, tp, swiglu)):
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
        stage = {k: v for k, v in stage.items() if not k.startswith("decoder.final_layernorm")
                 and k != "output_layer.weight" or pp_rank == pp - 1}
        if pp_rank == pp - 1 and tied and pp > 1:
            stage["output_layer.weight"] = tensors["embedding.word_embeddings.weight"]
        for tp_rank, state in enumerate(_shard_stage(stage, first, count, tp, bool(md["swiglu"]), padded)):
            out[(tp_rank, pp_rank)] = state
    return out


def _rank_file(iter_dir: str, tp_rank: int, pp_rank: int, pp: int, ep_rank: int = 0, ep: int = 1) -> str:
    name = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if ep > 1:
        name += f"_{ep_rank:03d}"
    return os.path.join(iter_dir, name, MODEL_FILENAME)


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
                          params_dtype: Optional[torch.dtype] = None, target_ep: int = 1) -> str:
    """Write the model of a message stream as a `torch`-format checkpoint at (target_tp, target_pp),
    and for a mixture-of-experts model at expert-parallel size target_ep (each expert-parallel
    rank's files hold num_experts / target_ep experts; experts are split over the tensor-parallel
    ranks like the dense MLP).

    Stages are written as soon as their layers have arrived. The tokenizer files named by the
    metadata are copied to `<save_dir>/tokenizer` and `args` points at them. Returns the iteration
    directory."""
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
    if _rank_dirs(iter_dir):
        raise ValueError(f"{iter_dir} already holds a checkpoint; its files would mix with the new layout's. "
                         "Choose an empty --save-dir or remove it first")
    os.makedirs(save_dir, exist_ok=True)
    tokenizer_flags = copy_tokenizer_files(md, os.path.join(save_dir, TOKENIZER_DIRNAME))
    args = _args_for(md, target_tp, target_pp, padded, tokenizer_flags, target_ep)
    swiglu = bool(md["swiglu"])
    tied = not md["untie_embeddings_and_output_weights"]
    dtype = None if params_dtype is None else params_dtype

    def write_stage(pp_rank: int, tensors: Dict[str, torch.Tensor]) -> None:
        first, count = stages[pp_rank]
        stage = dict(tensors)
        last = pp_rank == target_pp - 1
        if pp_rank != 0:
            stage.pop("embedding.word_embeddings.weight", None)
            stage.pop("embedding.position_embeddings.weight", None)
        if last and tied and target_pp > 1:
            stage["output_layer.weight"] = tensors["embedding.word_embeddings.weight"]
        if dtype is not None:
            stage = {k: v.to(dtype) for k, v in stage.items()}
        for tp_rank, tp_state in enumerate(_shard_stage(stage, first, count, target_tp, swiglu, padded)):
            for ep_rank, state_dict in enumerate(split_for_ep(tp_state, target_ep, num_experts)):
                state = {
                    "args": args,
                    "checkpoint_version": CHECKPOINT_VERSION,
                    "iteration": 0 if iteration is None else int(iteration),
                    "model": state_dict,
                    "num_floating_point_operations_so_far": 0.0,
                    "consumed_train_samples": args["consumed_train_samples"],
                    "consumed_valid_samples": args["consumed_valid_samples"],
                }
                atomic_torch_save(state, _rank_file(iter_dir, tp_rank, pp_rank, target_pp, ep_rank, target_ep))

    buffer: Dict[str, torch.Tensor] = {}
    stage = 0
    for name, payload in reader:
        buffer.update(payload)
        while stage < target_pp - 1 and _stage_complete(buffer, stages[stage]):
            write_stage(stage, buffer)
            keep = {"embedding.word_embeddings.weight"} if tied else set()
            first, count = stages[stage]
            buffer = {k: v for k, v in buffer.items() if k in keep or _layer_of(k) is not None
                      and _layer_of(k) >= first + count}
            stage += 1
    write_stage(target_pp - 1, buffer)
    atomic_write_text(os.path.join(save_dir, TRACKER_FILENAME),
                      "release" if iteration is None else str(int(iteration)))
    return iter_dir


def _layer_of(name: str) -> Optional[int]:
    match = _LAYER.match(name)
    return int(match.group(1)) if match else None


def _stage_complete(buffer: Dict[str, torch.Tensor], stage: Tuple[int, int]) -> bool:
    # Messages carry whole layers, so the stage is complete once its last layer has arrived.
    first, count = stage
    return count > 0 and any(_layer_of(k) == first + count - 1 for k in buffer)
