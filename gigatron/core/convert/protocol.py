"""The loader -> saver protocol of checkpoint conversion.

A loader produces a stream of messages, a saver consumes it. Each message is a pair
``(name, payload)``:

    ("metadata", md)                         the model description (a plain dict, see below)
    ("embeddings", tensors)                  embedding.word_embeddings.weight [V, h]
                                             (+ embedding.position_embeddings.weight [P, h])
    ("transformer layer {i}", tensors)       every tensor of decoder layer i (global number)
    ("final norm", tensors)                  decoder.final_layernorm.*
    ("output layer", tensors)                output_layer.weight [V, h] (untied models only)
    ("done", {})

Tensors are keyed by Gigatron's (Megatron-Core's) parameter names with the GLOBAL layer number
and are full logical tensors (see gigatron/core/convert/layout.py): the grouped QKV layout,
SwiGLU fc1 as [gate; up], vocabulary tensors with the true vocabulary (no padding rows).

The metadata dict holds Megatron's flag names for the model (`MODEL_FLAGS`: every TransformerConfig
field that describes the model, i.e. all but its run settings — layout, precision, kernels,
recompute; see `gigatron.core.transformer.config.model_fields`) plus: ``true_vocab_size``, the
tokenizer flags (`TOKENIZER_FLAGS`: DataConfig's tokenizer fields, make_vocab_size_divisible_by
among them), ``tokenizer_dir`` (a folder whose tokenizer files a saver copies, or None),
``params_dtype`` (a dtype name), ``iteration`` (None for a model that never trained here: saved as
``release``), the consumed-sample counts, and ``hf_config`` (the HuggingFace config.json the model
came from, or None). Mixture-of-experts models also carry `MOE_FLAGS` (MoEConfig's model fields;
``num_experts`` set), and their MoE layers' messages hold the router and every expert's weights
(global expert numbers) instead of the dense MLP. The three lists are derived from the config
dataclasses, so a new model field travels through every converter without an edit here.

`run_conversion` runs a loader in a background thread that feeds a bounded queue
(``--max-queue-size`` messages) while the saver consumes it in the calling thread, so reading
and writing overlap and at most that many messages wait in memory.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch

__all__ = [
    "Message",
    "MODEL_FLAGS",
    "MOE_FLAGS",
    "TOKENIZER_FLAGS",
    "model_metadata_from_args",
    "complete_metadata",
    "ConversionError",
    "layer_message",
    "expected_tensors",
    "message_sequence",
    "state_to_messages",
    "MessageReader",
    "collect_state",
    "run_conversion",
    "transformer_config_from_metadata",
    "dtype_from_name",
    "dtype_name",
    "moe_layer_flags",
    "moe_config_from_metadata",
]

Message = Tuple[str, Dict[str, Any]]

class ConversionError(ValueError):
    """A checkpoint cannot be converted (unsupported feature, missing or unexpected tensors)."""


from gigatron.core.data.config import DataConfig, tokenizer_fields  # noqa: E402
from gigatron.core.fields import model_fields  # noqa: E402
from gigatron.core.transformer.config import TransformerConfig  # noqa: E402
from gigatron.core.transformer.moe.config import MoEConfig  # noqa: E402

# The model flags carried in the metadata (Megatron's flag names, TransformerConfig fields).
MODEL_FLAGS = model_fields(TransformerConfig)

# Mixture-of-experts flags carried in the metadata (MoEConfig's model fields; absent or num_experts
# None: a dense model). MoE layers hold decoder.layers.i.mlp.router.weight [E, h] and, per expert j,
# mlp.experts.local_experts.j.linear_fc1.weight [fo, h] / linear_fc2.weight [h, f] (full tensors,
# global expert numbers) instead of mlp.linear_fc1 / linear_fc2.
MOE_FLAGS = model_fields(MoEConfig)

# The tokenizer flags carried in the metadata (DataConfig's tokenizer fields).
TOKENIZER_FLAGS = tokenizer_fields()


def _defaults(cls) -> Dict[str, Any]:
    values = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            values[f.name] = f.default_factory()  # type: ignore[misc]
    return values


def model_metadata_from_args(args: dict) -> dict:
    """The model part of the conversion metadata from a checkpoint's flat `args`: every
    `MODEL_FLAGS` entry (a missing or None one takes TransformerConfig's default, then the
    defaults that TransformerConfig derives: kv_channels, num_query_groups, ffn_hidden_size, …),
    the `MOE_FLAGS` of an MoE model and the `TOKENIZER_FLAGS`."""
    defaults = _defaults(TransformerConfig)
    md = {name: args.get(name) if args.get(name) is not None else defaults.get(name) for name in MODEL_FLAGS}
    if all(md.get(name) for name in ("num_layers", "hidden_size", "num_attention_heads")):
        derived = TransformerConfig(**{k: v for k, v in md.items() if v is not None},
                                    perform_initialization=False)
        md.update({name: getattr(derived, name) for name in MODEL_FLAGS})
    if args.get("num_experts"):
        # The messages carry the router and the routed experts only.
        if args.get("moe_shared_expert_intermediate_size"):
            raise ConversionError("converting MoE checkpoints with shared experts is not supported")
        if args.get("moe_router_enable_expert_bias"):
            raise ConversionError("converting MoE checkpoints with --moe-router-enable-expert-bias is not supported")
        moe_defaults = _defaults(MoEConfig)
        md.update({name: args.get(name) if args.get(name) is not None else moe_defaults.get(name)
                   for name in MOE_FLAGS})
    data_defaults = _defaults(DataConfig)
    md.update({name: args.get(name) if args.get(name) is not None else data_defaults.get(name)
               for name in TOKENIZER_FLAGS})
    return md


def complete_metadata(md: dict) -> dict:
    """`md` with every `MODEL_FLAGS` entry present (and every `MOE_FLAGS` one for an MoE model): a
    loader that does not know a model field (a HuggingFace family without it, an older checkpoint)
    leaves it at the config's default, which is what the model it read computes."""
    missing = {name: value for name, value in _defaults(TransformerConfig).items()
               if name in MODEL_FLAGS and name not in md}
    if md.get("num_experts"):
        missing.update({name: value for name, value in _defaults(MoEConfig).items()
                        if name in MOE_FLAGS and md.get(name) is None and value is not None})
    return {**md, **missing} if missing else md


def layer_message(i: int) -> str:
    return f"transformer layer {i}"


def _norm_names(prefix: str, md: dict) -> List[str]:
    names = [prefix + ".weight"]
    if md["normalization"] == "LayerNorm":
        names.append(prefix + ".bias")
    return names


def expected_tensors(md: dict) -> Dict[str, List[str]]:
    """Message name -> the tensor names that message must carry for the model `md` describes."""
    bias = bool(md["add_bias_linear"])
    out: Dict[str, List[str]] = {}
    emb = ["embedding.word_embeddings.weight"]
    if md["position_embedding_type"] == "learned_absolute":
        emb.append("embedding.position_embeddings.weight")
    out["embeddings"] = emb
    moe_layers = moe_layer_flags(md)
    for i in range(md["num_layers"]):
        out[layer_message(i)] = _layer_names(f"decoder.layers.{i}", md, moe_layers[i])
    out["final norm"] = _norm_names("decoder.final_layernorm", md)
    if md["untie_embeddings_and_output_weights"]:
        out["output layer"] = ["output_layer.weight"]
    for k in range(int(md.get("mtp_num_layers") or 0)):
        # a multi-token prediction block; its layer is built like the decoder's last
        p = f"mtp.layers.{k}"
        out[f"mtp layer {k}"] = (_norm_names(p + ".enorm", md) + _norm_names(p + ".hnorm", md) + [p + ".eh_proj.weight"]
                                 + _layer_names(p + ".transformer_layer", md, moe_layers[-1])
                                 + _norm_names(p + ".final_layernorm", md))
    return out


def _attention_names(p: str, md: dict) -> List[str]:
    """The self-attention tensors of the layer at prefix `p` (grouped QKV, or multi-latent attention's)."""
    bias = bool(md["add_bias_linear"])
    a = p + ".self_attention"
    if md.get("multi_latent_attention"):
        lora_q = md.get("q_lora_rank") is not None
        names = [a + ".linear_q_down_proj.weight", a + ".linear_q_up_proj.weight"] if lora_q \
            else [a + ".linear_q_proj.weight"]
        names += [a + ".linear_kv_down_proj.weight", a + ".linear_kv_up_proj.weight"]
        if md.get("qk_layernorm"):
            names += (_norm_names(a + ".q_layernorm", md) if lora_q else []) + _norm_names(a + ".kv_layernorm", md)
    else:
        names = [a + ".linear_qkv.weight"]
        if bias or md.get("add_qkv_bias"):
            names.append(a + ".linear_qkv.bias")
        if md.get("qk_layernorm"):
            names += _norm_names(a + ".q_layernorm", md)
            names += _norm_names(a + ".k_layernorm", md)
    names.append(a + ".linear_proj.weight")
    if bias:
        names.append(a + ".linear_proj.bias")
    return names


def _layer_names(p: str, md: dict, is_moe: bool) -> List[str]:
    """The tensors of the transformer layer at prefix `p`."""
    bias = bool(md["add_bias_linear"])
    names = _norm_names(p + ".input_layernorm", md) + _attention_names(p, md)
    names += _norm_names(p + ".pre_mlp_layernorm", md)
    if is_moe:
        names.append(p + ".mlp.router.weight")
        for j in range(int(md["num_experts"])):
            names += [f"{p}.mlp.experts.local_experts.{j}.linear_fc1.weight",
                      f"{p}.mlp.experts.local_experts.{j}.linear_fc2.weight"]
        return names
    names.append(p + ".mlp.linear_fc1.weight")
    if bias:
        names.append(p + ".mlp.linear_fc1.bias")
    names.append(p + ".mlp.linear_fc2.weight")
    if bias:
        names.append(p + ".mlp.linear_fc2.bias")
    return names


def moe_config_from_metadata(md: dict):
    """The MoEConfig of the model `md` describes, or None for a dense model."""
    if not md.get("num_experts"):
        return None
    from gigatron.core.transformer.moe.config import MoEConfig

    kwargs = {name: md[name] for name in MOE_FLAGS if md.get(name) is not None}
    return MoEConfig(**kwargs)


def moe_layer_flags(md: dict) -> List[bool]:
    """For each layer of the model `md` describes, whether it is an MoE layer."""
    config = moe_config_from_metadata(md)
    if config is None:
        return [False] * int(md["num_layers"])
    from gigatron.core.transformer.moe.config import moe_layer_pattern

    return moe_layer_pattern(config, int(md["num_layers"]))


def message_sequence(md: dict) -> List[str]:
    """The message names in the order a loader sends them (after "metadata", before "done")."""
    return list(expected_tensors(md))


def state_to_messages(md: dict, tensors: Dict[str, torch.Tensor]) -> Iterator[Message]:
    """Messages for a model held as one dict of full tensors."""
    yield "metadata", md
    for name, names in expected_tensors(md).items():
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ConversionError(f"the checkpoint lacks {', '.join(missing[:6])} (needed for '{name}')")
        yield name, {n: tensors[n] for n in names}
    yield "done", {}


class MessageReader:
    """Reads a message stream and checks it against the metadata.

    Missing tensors are always an error (the saved model would be broken). With `checking`, the
    message order must be the expected one and a message must not carry tensors the model does not
    have; without it (--no-checking) such extra tensors are dropped."""

    def __init__(self, messages: Iterable[Message], checking: bool = True):
        self._it = iter(messages)
        self.checking = checking
        name, md = self._next()
        if name != "metadata":
            raise ConversionError(f"the loader's first message is '{name}', expected 'metadata'")
        self.md = complete_metadata(md)
        self._expected = expected_tensors(md)
        self._order = list(self._expected)

    def _next(self) -> Message:
        try:
            return next(self._it)
        except StopIteration:
            raise ConversionError("the loader stopped before sending 'done'") from None

    def __iter__(self) -> Iterator[Message]:
        seen = set()
        while True:
            name, payload = self._next()
            if name == "done":
                missing = [n for n in self._order if n not in seen]
                if missing:
                    raise ConversionError(f"the loader finished without sending {missing[:4]}")
                return
            if name not in self._expected:
                raise ConversionError(f"unexpected message '{name}' for a model with {self.md['num_layers']} "
                                      "layers; the loader and the metadata disagree")
            if name in seen:
                raise ConversionError(f"message '{name}' was sent twice")
            if self.checking:
                position = len(seen)
                if self._order[position] != name:
                    raise ConversionError(f"message '{name}' arrived where '{self._order[position]}' was expected "
                                          "(use --no-checking to accept another order)")
            seen.add(name)
            wanted = self._expected[name]
            missing = [n for n in wanted if n not in payload]
            if missing:
                raise ConversionError(f"message '{name}' lacks {', '.join(missing)}")
            extra = [n for n in payload if n not in wanted]
            if extra and self.checking:
                raise ConversionError(f"message '{name}' carries tensors this model does not have: "
                                      f"{', '.join(extra)} (use --no-checking to drop them)")
            yield name, {n: payload[n] for n in wanted}


def collect_state(messages: Iterable[Message], checking: bool = True) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(metadata, {name: full tensor}) from a message stream."""
    reader = MessageReader(messages, checking)
    tensors: Dict[str, torch.Tensor] = {}
    for _, payload in reader:
        tensors.update(payload)
    return reader.md, tensors


_END = object()


def run_conversion(loader: Iterable[Message], saver: Callable[[Iterator[Message]], Any],
                   max_queue_size: int = 50) -> Any:
    """Run `loader` (an iterable of messages) in a background thread feeding a queue of at most
    `max_queue_size` messages, and `saver(messages)` in this thread. Errors of either side are
    raised here; the loader stops when the saver fails."""
    if max_queue_size < 1:
        raise ValueError(f"--max-queue-size must be >= 1, got {max_queue_size}")
    q: "queue.Queue" = queue.Queue(maxsize=max_queue_size)
    stop = threading.Event()
    failure: List[BaseException] = []

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for message in loader:
                if not put(message):
                    return
        except BaseException as exc:  # handed to the consumer, raised in the calling thread
            failure.append(exc)
        put(_END)

    def consume() -> Iterator[Message]:
        while True:
            item = q.get()
            if item is _END:
                if failure:
                    raise failure[0]
                return
            yield item

    thread = threading.Thread(target=produce, name="checkpoint-loader", daemon=True)
    thread.start()
    try:
        return saver(consume())
    finally:
        stop.set()
        thread.join()


def transformer_config_from_metadata(md: dict, tensor_model_parallel_size: int = 1,
                                     pipeline_model_parallel_size: int = 1,
                                     params_dtype: Optional[torch.dtype] = None, **overrides):
    """A TransformerConfig for the model `md` describes, at the given parallel sizes."""
    from gigatron.core.transformer.config import TransformerConfig

    kwargs = {name: md[name] for name in MODEL_FLAGS if name in md and md[name] is not None}
    dtype = params_dtype if params_dtype is not None else dtype_from_name(md.get("params_dtype", "float32"))
    kwargs.update(params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
                  tensor_model_parallel_size=tensor_model_parallel_size,
                  pipeline_model_parallel_size=pipeline_model_parallel_size)
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


def dtype_from_name(name) -> torch.dtype:
    """torch dtype from 'bfloat16' / 'torch.bfloat16' / a dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).replace("torch.", "")
    if key not in _DTYPES:
        raise ConversionError(f"unsupported parameter dtype {name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
