"""The command line, generated from the config dataclasses.

Every field of every config dataclass becomes a flag: `micro_batch_size` -> `--micro-batch-size`.
The `--help` text is the string literal written under the field (read from the class source with
`ast`), the type comes from the annotation:

    bool, default False   ->  --name            (store_true)
    bool, default True    ->  --no-name         (store_false; --name is accepted too)
    int / float / str     ->  --name VALUE
    Literal[a, b]         ->  --name {a,b}
    list[X]               ->  --name V [V ...]
    Optional[X]           ->  as X, default None

Fields whose type cannot be written on a command line (torch.dtype, callables, modules) and fields
declared with `init=False` are derived, not flags. Megatron's flags whose name or sense differs from
the field sit in `ALIASES`, the one table of such names. Unknown flags are an error (no prefix
matching either: `allow_abbrev=False`), so a Megatron flag that Gigatron does not implement is never
silently ignored.

`--yaml-cfg FILE` reads a YAML mapping whose keys are the field names (`-` or `_`); it may group
keys in sections (one level of nesting). Flags given on the command line win over the YAML file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import functools
import importlib
import inspect
import sys
import textwrap
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = [
    "CONFIG_SOURCES",
    "ALIASES",
    "ACCEPTED_NO_EFFECT",
    "NOT_BUILT",
    "not_built_capability",
    "Alias",
    "Configs",
    "FlagSpec",
    "config_classes",
    "field_docstrings",
    "flag_specs",
    "build_parser",
    "parse_args",
    "configs_from_args",
    "args_dict_from_configs",
    "explicit_flags",
    "default_tokenizer_type",
]

# name in `Configs`, module, class. Imported lazily, on first use.
CONFIG_SOURCES: tuple[tuple[str, str, str], ...] = (
    ("transformer", "gigatron.core.transformer.config", "TransformerConfig"),
    ("parallel", "gigatron.core.parallel.config", "ParallelConfig"),
    ("moe", "gigatron.core.transformer.moe.config", "MoEConfig"),
    ("mamba", "gigatron.core.transformer.mamba.config", "MambaConfig"),
    ("ddp", "gigatron.core.distributed.config", "DDPConfig"),
    ("optimizer", "gigatron.core.optim.config", "OptimizerConfig"),
    ("scheduler", "gigatron.core.optim.config", "SchedulerConfig"),
    ("data", "gigatron.core.data.config", "DataConfig"),
    ("training", "gigatron.training.config", "TrainingConfig"),
    ("checkpoint", "gigatron.training.config", "CheckpointConfig"),
    ("logging", "gigatron.training.config", "LoggingConfig"),
    ("fp8", "gigatron.core.fp8.config", "FP8Config"),
)


def config_classes() -> dict[str, type]:
    """Import and return the config dataclasses named in `CONFIG_SOURCES`, by their `Configs` name."""
    classes = {}
    for name, module_name, class_name in CONFIG_SOURCES:
        module = importlib.import_module(module_name)
        classes[name] = getattr(module, class_name)
    return classes


class _Rename:
    """Marker: the alias takes a value like the field's own flag."""

    def __repr__(self) -> str:
        return "RENAME"


RENAME = _Rename()


@dataclass(frozen=True)
class Alias:
    """A Megatron flag whose name differs from the field it sets.

    With `value` left unset the alias takes a value exactly like the field's own flag (a rename);
    with `value` set it is a switch that stores `value` in the field (an inverted or derived flag).
    """

    dest: str
    value: Any = RENAME
    help: str = ""
    replaces: bool = False
    """The alias is the field's only flag: the name generated from the field is not offered
    (a Gigatron spelling that Megatron never had)."""


ALIASES: dict[str, Alias] = {
    "--disable-bias-linear": Alias("add_bias_linear", False, "Disable bias in the linear layers."),
    "--recompute-activations": Alias(
        "recompute_granularity", "selective", "Recompute the core attention in the backward pass (selective)."
    ),
    "--accumulate-allreduce-grads-in-fp32": Alias(
        "grad_reduce_in_fp32", True, "Accumulate and all-reduce gradients in fp32."
    ),
    "--ddp-bucket-size": Alias("bucket_size", help="Bucket size (number of parameters) for data-parallel communication.",
                               replaces=True),
    "--ddp-average-in-collective": Alias(
        "average_in_collective", True, "Average gradients inside the collective instead of scaling before it.",
        replaces=True,
    ),
    "--ddp-pad-buckets-for-high-nccl-busbw": Alias(
        "pad_buckets_for_high_nccl_busbw", True, "Pad buckets for higher NCCL bus bandwidth.", replaces=True,
    ),
    "--use-tp-pp-dp-mapping": Alias(
        "order", "tp-cp-ep-pp-dp", "Lay ranks out in Megatron's tp-pp-dp order (pipeline before data parallel)."
    ),
    "--no-create-attention-mask-in-dataloader": Alias(
        "create_attention_mask_in_dataloader", False, "Do not build attention masks in the data loader."
    ),
    "--no-mmap-bin-files": Alias("mmap_bin_files", False, "Read .bin files with file reads instead of mmap."),
    "--num-virtual-stages-per-pipeline-rank": Alias(
        "virtual_pipeline_model_parallel_size", help="Number of virtual pipeline stages per pipeline rank."
    ),
    "--override-opt_param-scheduler": Alias(
        "override_opt_param_scheduler", True, "Megatron's spelling of --override-opt-param-scheduler."
    ),
    "--use-checkpoint-opt_param-scheduler": Alias(
        "use_checkpoint_opt_param_scheduler", True, "Megatron's spelling of --use-checkpoint-opt-param-scheduler."
    ),
    "--local_rank": Alias("local_rank", help="Local rank (spelling used by torch.distributed.launch)."),
    "--use-rotary-position-embeddings": Alias(
        "position_embedding_type", "rope", "Megatron's older spelling of --position-embedding-type rope."
    ),
    "--hybrid-layer-pattern": Alias(
        "hybrid_override_pattern", help="Megatron's newer name of --hybrid-override-pattern (one symbol per layer)."
    ),
    "--fp8-format": Alias("fp8", help="FP8 format of the linear layers' GEMMs.", replaces=True),
}

# Megatron switches that are resolved against other flags after parsing, whatever their order on
# the command line: flag -> (its namespace entry, help).
LATE_SWITCHES: dict[str, tuple[str, str]] = {
    "--no-position-embedding": (
        "_no_position_embedding",
        "No learned absolute position embeddings: with rotary embeddings (--use-rotary-position-embeddings or "
        "--position-embedding-type rope) it changes nothing; otherwise the model gets no position information "
        "(--position-embedding-type none).",
    ),
}


def _resolve_late_switches(args: argparse.Namespace) -> set:
    """Apply the `LATE_SWITCHES` given; returns the fields they set."""
    changed = set()
    if getattr(args, "_no_position_embedding", False):
        if getattr(args, "position_embedding_type", None) == "learned_absolute":
            args.position_embedding_type = "none"
            changed.add("position_embedding_type")
    for dest, _ in LATE_SWITCHES.values():
        if hasattr(args, dest):
            delattr(args, dest)
    return changed

# Megatron flags that ask for what Gigatron always does; accepted so that existing launch scripts
# run, and listed here with the reason they change nothing.
ACCEPTED_NO_EFFECT: dict[str, str] = {
    "--use-mcore-models": "Gigatron's models are always Megatron-Core models.",
    "--no-masked-softmax-fusion": "Gigatron has no fused masked-softmax kernel (attention uses PyTorch SDPA).",
    "--no-bias-dropout-fusion": "Gigatron has no fused bias-dropout-add kernel.",
    "--no-rope-fusion": "Gigatron has no fused rotary-embedding kernel.",
    "--no-gradient-accumulation-fusion": "Gigatron accumulates weight gradients into main_grad without a fused kernel.",
    "--moe-permute-fusion": "Gigatron has no fused token-permutation kernel; tokens are permuted with index_select/"
                            "scatter_add, which compute the same result.",
    "--moe-shared-expert-overlap": "an overlap of the shared expert's computation with the token dispatch: a "
                                   "scheduling change with the same result; Gigatron runs them one after the other.",
    "--ckpt-fully-parallel-save": "a speed-up with the same files: Megatron spreads the writing of data-parallel "
                                  "replicated weights over the replicas; Gigatron writes each shard once, from the "
                                  "first replica (distributed-optimizer states from every rank).",
    "--ckpt-fully-parallel-load": "each rank reads only the shards it needs, so the reads are already spread.",
    "--no-use-tokenizer-model-from-checkpoint-args": "with --use-checkpoint-args the tokenizer settings given "
                                                     "for the run are always the run's.",
}

# Megatron flags of capabilities that Gigatron has not built yet, by exact flag or by prefix (an
# entry ending in "-"). Such a flag is refused with one line naming the missing capability instead
# of "unrecognized arguments". A family that gets built adds its flags to a config dataclass; the
# parser then knows them and this table is never consulted for them.
NOT_BUILT: dict[str, str] = {
    "--linear-conv-kernel-dim": "linear attention (Gated DeltaNet convolutions)",
    "--te-rng-tracker": "Transformer Engine",
    "--moe-latent-size": "latent MoE",
    "--moe-flex-dispatcher-backend": "the flex (DeepEP/HybridEP) MoE token dispatcher",
    "--moe-router-force-load-balancing": "forced MoE load balancing (a benchmarking mode)",
    "--moe-router-fusion": "fused MoE router kernels",
    "--ddp-num-buckets": "a bucket count for data-parallel communication (--ddp-bucket-size sets the size)",
    "--moe-pad-experts-for-cuda-graph-inference": "CUDA graphs",
    "--cuda-graph-": "CUDA graphs for the training step",
    "--enable-cuda-graph": "CUDA graphs for the training step",
    "--external-cuda-graph": "CUDA graphs for the training step",
    "--decode-only-cuda-graphs": "CUDA graphs",
    "--use-megatron-fsdp": "Megatron FSDP",
    "--megatron-fsdp-": "Megatron FSDP",
    "--fsdp-": "Megatron FSDP",
    "--data-parallel-sharding-strategy": "Megatron FSDP",
    "--use-nccl-ub": "NCCL user buffers",
    "--enable-gpt-oss": "gpt-oss models",
    "--softmax-type": "attention sinks (gpt-oss softmax variants)",
    "--activation-func-clamp-value": "gpt-oss models (clamped activations)",
    "--glu-linear-offset": "gpt-oss models (GLU with a linear offset)",
    "--quick-geglu": "gpt-oss models (quick GeGLU)",
    "--window-attn-skip-freq": "interleaved sliding-window/full attention layers",
    "--use-fused-weighted-squared-relu": "fused weighted squared-ReLU kernels",
    "--init-model-with-meta-device": "building the model on the meta device",
    "--rerun-mode": "the rerun state machine (result validation by re-running iterations)",
    "--log-straggler": "straggler detection",
    "--disable-straggler-on-startup": "straggler detection",
    "--straggler-minmax-count": "straggler detection",
    "--check-weight-hash-across-dp-replicas-interval": "weight-hash checks across data-parallel replicas",
    "--disable-gloo-process-groups": "running without gloo process groups",
    "--enable-experimental": "Megatron's experimental features",
    "--param-to-param-group-map-json": "per-parameter optimizer groups from a JSON map",
    "--save-retain-interval": "checkpoint retention",
    "--ckpt-assume-constant-structure": "cached checkpoint save plans",
    "--disable-bf16-reduced-precision-matmul": "switching off bf16 reduced-precision matmul",
    "--no-rope-freq": "layers without rotary embeddings (NoPE layers)",
    "--tokenizer-hf-include-special-tokens": "HuggingFace special-token handling options",
    "--logging-level": "Python logging levels",
    "--log-progress": "progress logging (progress.txt)",
    "--timing-log-option": "timer reductions over ranks",
    "--tensor-parallel-num-weight-shards": "weight sharding within tensor parallelism",
    "--expert-tensor-parallel-num-weight-shards": "weight sharding within tensor parallelism",
    "--sft": "supervised fine-tuning datasets",
    "--inference-": "the inference server's flags (tools/run_text_generation_server.py takes its own)",
    "--grpo-": "reinforcement learning (GRPO)",
    "--rl-": "reinforcement learning (GRPO)",
    "--no-rl-": "reinforcement learning (GRPO)",
    "--langrl-": "reinforcement learning (GRPO)",
    "--img-": "multimodal models",
    "--vision-": "multimodal models",
    "--patch-dim": "multimodal models",
    "--pixel-shuffle": "multimodal models",
    "--use-tiling": "multimodal models",
    "--max-num-tiles": "multimodal models",
    "--use-thumbnail": "multimodal models",
    "--use-tile-tags": "multimodal models",
    "--image-tag-type": "multimodal models",
    "--disable-vision-class-token": "multimodal models",
    "--language-model-type": "multimodal models",
    "--num-frames": "multimodal models",
    "--export-": "ModelOpt export",
}


def not_built_capability(option: str) -> Optional[str]:
    """The capability a flag of `NOT_BUILT` needs, or None for a flag that is not listed there."""
    name = option.split("=", 1)[0]
    if name in NOT_BUILT:
        return NOT_BUILT[name]
    prefixes = [p for p in NOT_BUILT if p.endswith("-") and name.startswith(p)]
    return NOT_BUILT[max(prefixes, key=len)] if prefixes else None


@dataclass
class FlagSpec:
    """One generated flag: the field it sets, its option strings and argparse keywords."""

    dest: str
    owners: list[str]
    option_strings: list[str]
    kwargs: dict
    default: Any
    help: str


# ------------------------------------------------------------------ docstrings and types


def field_docstrings(cls: type) -> dict[str, str]:
    """Map field name -> the string literal that follows it in the class body (bases included)."""
    return dict(_field_docstrings(cls))


# Reading and parsing a class's source is most of the time of building a parser, which every
# parse_args does: each class is read once per process (a class's source does not change).
@functools.lru_cache(maxsize=None)
def _field_docstrings(cls: type) -> dict[str, str]:
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(source)
        class_node = next(node for node in tree.body if isinstance(node, ast.ClassDef))
        body = class_node.body
        for node, following in zip(body, body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant)
                and isinstance(following.value.value, str)
            ):
                docs[node.target.id] = " ".join(inspect.cleandoc(following.value.value).split())
    return docs


def _resolve_types(cls: type) -> dict[str, Any]:
    return dict(_resolved_types(cls))


@functools.lru_cache(maxsize=None)
def _resolved_types(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception:
        pass
    # Some annotation names only exist under TYPE_CHECKING: resolve field by field.
    module = sys.modules.get(cls.__module__)
    namespace = dict(vars(module)) if module else {}
    hints = {}
    for f in dataclasses.fields(cls):
        annotation = f.type
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - annotations of our own modules
            except Exception:
                annotation = None
        hints[f.name] = annotation
    return hints


_SCALARS = (bool, int, float, str)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        return typing.Union[tuple(args)]
    return tp


def _scalar_parser(tp) -> Optional[Callable[[str], Any]]:
    """A str -> value converter for a scalar annotation, or None when there is none."""
    if tp in (int, float, str):
        return tp
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return None  # handled by choices
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if all(m in (int, float, str) for m in members):
            order = [m for m in (int, float, str) if m in members]

            def convert(text: str, _order=order):
                for kind in _order:
                    try:
                        return kind(text)
                    except ValueError:
                        continue
                raise argparse.ArgumentTypeError(f"{text!r} is not one of {[k.__name__ for k in _order]}")

            convert.__name__ = "/".join(k.__name__ for k in order)
            return convert
    return None


def _literal_kwargs(tp) -> Optional[dict]:
    if typing.get_origin(tp) is not typing.Literal:
        return None
    choices = list(typing.get_args(tp))
    kinds = {type(c) for c in choices}
    if len(kinds) != 1 or next(iter(kinds)) not in (int, float, str):
        return None
    return {"choices": choices, "type": next(iter(kinds))}


def _int_or_int_list(text: str):
    """An int ("2") or a list of ints written as a Python expression of lists, `+` and `*`
    (Megatron's --moe-layer-freq spelling: "[1,0,1,0]", "([1]*3+[0]*1)*2")."""

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, (ast.List, ast.Tuple)):
            return [value(e) for e in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            return left + right if isinstance(node.op, ast.Add) else left * right
        raise ValueError

    try:
        result = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError):
        result = None
    if isinstance(result, int) or (isinstance(result, list) and all(type(v) is int for v in result)):
        return result
    raise argparse.ArgumentTypeError(f"{text!r} is neither an int nor a list of ints such as [1,0,1,0] or ([1]*3+[0])*2")


def _is_int_or_int_list(tp) -> bool:
    if typing.get_origin(tp) not in (typing.Union, types.UnionType):
        return False
    members = [a for a in typing.get_args(tp) if a is not type(None)]
    return len(members) == 2 and int in members and any(
        typing.get_origin(m) in (list, typing.List) and typing.get_args(m) == (int,) for m in members)


def _int_pair(text: str) -> tuple:
    """Two ints written `A,B` (Megatron's tuple spelling; "(A, B)" and "[A, B]" too)."""
    parts = text.strip().strip("()[]").split(",")
    try:
        if len(parts) == 2:
            return tuple(int(p) for p in parts)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not two integers written A,B (e.g. 4096,0)")


def _is_int_pair(tp) -> bool:
    return typing.get_origin(tp) in (tuple, typing.Tuple) and typing.get_args(tp) == (int, int)


def _value_kwargs(tp) -> Optional[dict]:
    """argparse keywords for a non-bool field type, or None if it is not a command-line type."""
    tp = _strip_optional(tp)
    if _is_int_pair(tp):
        return {"type": _int_pair, "metavar": "A,B"}
    if _is_int_or_int_list(tp):
        return {"type": _int_or_int_list}
    literal = _literal_kwargs(tp)
    if literal is not None:
        return literal
    scalar = _scalar_parser(tp)
    if scalar is not None:
        return {"type": scalar}
    origin = typing.get_origin(tp)
    if origin in (list, tuple, Sequence, typing.Sequence) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        element = args[0] if args else str
        element_kwargs = _value_kwargs(element) if element is not bool else None
        if element_kwargs is None:
            return None
        return {**element_kwargs, "nargs": "+"}
    return None


def _is_bool(tp) -> bool:
    return _strip_optional(tp) is bool


def _default_of(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ------------------------------------------------------------------ generation


def flag_specs(classes: Optional[dict[str, type]] = None) -> tuple[dict[str, FlagSpec], list[str]]:
    """Generate the flags for `classes` (default: `config_classes()`).

    Returns (specs by field name, conflicts): a field name that occurs in several dataclasses gives
    one flag setting all of them; `conflicts` lists those whose defaults or kinds disagree.
    """
    classes = config_classes() if classes is None else classes
    specs: dict[str, FlagSpec] = {}
    conflicts: list[str] = []
    for owner, cls in classes.items():
        docs = field_docstrings(cls)
        hints = _resolve_types(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name.startswith("_"):
                continue
            tp = hints.get(f.name)
            default = _default_of(f)
            help_text = docs.get(f.name, "")
            if _is_bool(tp):
                if default:
                    options = [_flag("no_" + f.name), _flag(f.name)]
                else:
                    options = [_flag(f.name)]
                kwargs = {"kind": "bool"}
            else:
                value_kwargs = _value_kwargs(tp) if tp is not None else None
                if value_kwargs is None:
                    continue  # derived field (dtype, callable, …): not a flag
                options = [_flag(f.name)]
                kwargs = value_kwargs
            if f.name in specs:
                existing = specs[f.name]
                existing.owners.append(owner)
                if existing.default != default or existing.kwargs.get("kind") != kwargs.get("kind"):
                    conflicts.append(
                        f"{f.name}: {existing.owners[0]} default {existing.default!r}, {owner} default {default!r}"
                    )
                continue
            specs[f.name] = FlagSpec(f.name, [owner], options, kwargs, default, help_text)
    return specs, conflicts


def _add_spec(group, spec: FlagSpec) -> None:
    default_text = "" if spec.default in (None, "", False) else f" (default: {spec.default})"
    if spec.kwargs.get("kind") == "bool":
        if spec.default:
            group.add_argument(spec.option_strings[0], dest=spec.dest, action="store_false", help=spec.help)
            group.add_argument(
                spec.option_strings[1], dest=spec.dest, action="store_true", help=f"Turn on {spec.dest} (the default)."
            )
        else:
            group.add_argument(spec.option_strings[0], dest=spec.dest, action="store_true", help=spec.help)
        return
    kwargs = dict(spec.kwargs)
    group.add_argument(*spec.option_strings, dest=spec.dest, default=spec.default, help=spec.help + default_text,
                       **kwargs)


def _add_aliases(parser: argparse.ArgumentParser, specs: dict[str, FlagSpec]) -> None:
    group = parser.add_argument_group("Megatron flag names", "Flags whose name differs from the field they set.")
    taken = set(parser._option_string_actions)  # noqa: SLF001 - argparse keeps no public index
    for option, alias in ALIASES.items():
        spec = specs.get(alias.dest)
        if spec is None or option in taken:
            continue
        text = (spec.help if alias.replaces and spec.help else alias.help) or f"Sets {alias.dest}."
        if alias.value is RENAME:
            if spec.kwargs.get("kind") == "bool":
                group.add_argument(option, dest=alias.dest, action="store_true", help=text)
            else:
                group.add_argument(option, dest=alias.dest, default=spec.default,
                                   help=f"{text} Same as {spec.option_strings[0]}.", **spec.kwargs)
        else:
            group.add_argument(option, dest=alias.dest, action="store_const", const=alias.value, default=spec.default,
                               help=f"{text} ({alias.dest}={alias.value!r})")
    for option, (dest, text) in LATE_SWITCHES.items():
        if option not in taken:
            group.add_argument(option, action="store_true", dest=dest, help=text)
    for option, reason in ACCEPTED_NO_EFFECT.items():
        if option not in taken:
            group.add_argument(option, action="store_true", dest="_accepted_" + option.strip("-").replace("-", "_"),
                               help=f"Accepted for compatibility: {reason}")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose unknown-flag error suggests the closest known flags."""

    def parse_known_args(self, args=None, namespace=None):  # noqa: D401 - argparse override
        namespace, extras = super().parse_known_args(args, namespace)
        unknown = [a for a in extras if a.startswith("-")]
        missing = [(a.split("=", 1)[0], not_built_capability(a)) for a in unknown]
        missing = [(name, capability) for name, capability in missing if capability]
        if missing:
            name, capability = missing[0]
            others = f" (also: {', '.join(n for n, _ in missing[1:])})" if len(missing) > 1 else ""
            self.error(f"{name} needs {capability}, which Gigatron does not have yet{others}; "
                       "remove the flag to run without it.")
        if unknown:
            known = list(self._option_string_actions)
            hints = []
            for option in unknown:
                name = option.split("=", 1)[0]
                close = difflib.get_close_matches(name, known, n=3)
                hints.append(f"{name} (did you mean {', '.join(close)}?)" if close else name)
            self.error(
                "unrecognized arguments: " + "; ".join(hints)
                + ". Gigatron does not implement these flags; remove them from the command line."
            )
        return namespace, extras


def build_parser(
    classes: Optional[dict[str, type]] = None,
    extra_args_provider: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
) -> argparse.ArgumentParser:
    """Build the parser for `classes` (default: all config dataclasses), one group per dataclass."""
    classes = config_classes() if classes is None else classes
    specs, _ = flag_specs(classes)
    parser = _Parser(description="Gigatron arguments", allow_abbrev=False)
    parser.add_argument("--yaml-cfg", default=None, metavar="FILE",
                        help="YAML file of field names and values; command-line flags override it.")
    groups = {}
    for owner, cls in classes.items():
        summary = (inspect.getdoc(cls) or "").split("\n")[0]
        if summary.startswith(cls.__name__ + "("):  # dataclass' generated signature doc
            summary = ""
        groups[owner] = parser.add_argument_group(cls.__name__, summary or None)
    replaced = {alias.dest for alias in ALIASES.values() if alias.replaces}
    for spec in specs.values():
        if spec.dest not in replaced:
            _add_spec(groups[spec.owners[0]], spec)
    _add_aliases(parser, specs)
    if extra_args_provider is not None:
        extra_args_provider(parser)
    parser.set_defaults(_flag_owners={name: list(spec.owners) for name, spec in specs.items()})
    return parser


def _flatten_yaml(mapping: dict, path: str) -> dict:
    flat: dict = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            for inner_key, inner_value in value.items():
                if isinstance(inner_value, dict):
                    raise ValueError(f"--yaml-cfg {path}: section {key}.{inner_key} is nested too deeply; "
                                     "use one level of sections at most")
                flat[str(inner_key).replace("-", "_")] = inner_value
        else:
            flat[str(key).replace("-", "_")] = value
    return flat


def _yaml_defaults(path: str, parser: argparse.ArgumentParser) -> dict:
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            loaded = yaml.safe_load(handle) or {}
    except FileNotFoundError:
        raise ValueError(f"--yaml-cfg {path}: file not found") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"--yaml-cfg {path}: expected a mapping of field names to values, got {type(loaded).__name__}")
    values = _flatten_yaml(loaded, path)
    dests = {action.dest for action in parser._actions}  # noqa: SLF001
    unknown = sorted(k for k in values if k not in dests)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(dests), n=2)
            hints.append(f"{key} (did you mean {', '.join(close)}?)" if close else key)
        raise ValueError(f"--yaml-cfg {path}: unknown keys: {'; '.join(hints)}")
    return values


def parse_args(
    argv: Optional[Sequence[str]] = None,
    extra_args_provider: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
    defaults: Optional[dict] = None,
    classes: Optional[dict[str, type]] = None,
) -> argparse.Namespace:
    """Parse `argv` (default `sys.argv[1:]`) into a flat namespace of field values.

    `defaults` overrides field defaults (a script's own defaults); a `--yaml-cfg` file overrides
    those, and flags on the command line override everything.
    """
    parser = build_parser(classes, extra_args_provider)
    argv = list(sys.argv[1:] if argv is None else argv)
    if defaults:
        parser.set_defaults(**defaults)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--yaml-cfg", default=None)
    known, _ = pre.parse_known_args(argv)
    from_yaml: dict = {}
    if known.yaml_cfg:
        from_yaml = _yaml_defaults(known.yaml_cfg, parser)
        parser.set_defaults(**from_yaml)
    args = parser.parse_args(argv)
    for key in [k for k in vars(args) if k.startswith("_accepted_")]:
        delattr(args, key)
    late = _resolve_late_switches(args)
    args._explicit = frozenset(from_yaml) | _given_on_command_line(parser, argv) | late
    return args


def default_tokenizer_type(args: argparse.Namespace, tokenizer_type: str) -> argparse.Namespace:
    """A script's default --tokenizer-type, as Megatron's entry points set it (pretrain_gpt.py:
    GPT2BPETokenizer, pretrain_bert.py: BertWordPieceLowerCase): used when the run names no
    tokenizer (neither --tokenizer-type nor --vocab-size, which alone selects a NullTokenizer)."""
    if getattr(args, "tokenizer_type", None) is None and getattr(args, "vocab_size", None) is None:
        args.tokenizer_type = tokenizer_type
    return args


def _given_on_command_line(parser: argparse.ArgumentParser, argv: Sequence[str]) -> frozenset:
    """The destinations that `argv` sets (parsed again with every default suppressed)."""
    actions = parser._actions  # noqa: SLF001 - argparse keeps no public list
    saved = [(action, action.default) for action in actions]
    saved_defaults = dict(parser._defaults)  # noqa: SLF001
    try:
        for action in actions:
            action.default = argparse.SUPPRESS
        parser._defaults.clear()  # noqa: SLF001
        given = parser.parse_args(list(argv))
    finally:
        for action, default in saved:
            action.default = default
        parser._defaults.update(saved_defaults)  # noqa: SLF001
    return frozenset(k for k in vars(given) if not k.startswith("_"))


# ------------------------------------------------------------------ namespace -> dataclasses


@dataclass
class Configs:
    """One instance of each config dataclass, built from the parsed flags: where the command line
    ends. Everything after argument parsing reads these (each setting from the config that owns it).

    `extra` holds the values of flags that a script added with its `extra_args_provider` (BERT's
    --bert-layernorm, T5's --decoder-num-layers, a task's flags …), by name; `world_size` is the
    number of processes the flags were validated for (None: not validated)."""

    transformer: Any = None
    parallel: Any = None
    moe: Any = None
    mamba: Any = None
    ddp: Any = None
    optimizer: Any = None
    scheduler: Any = None
    data: Any = None
    training: Any = None
    checkpoint: Any = None
    logging: Any = None
    fp8: Any = None
    extra: dict = dataclasses.field(default_factory=dict)
    world_size: Optional[int] = None

    def items(self) -> Iterable[tuple[str, Any]]:
        """(name, config) for each config dataclass (not `extra`)."""
        return ((name, getattr(self, name)) for name, _, _ in CONFIG_SOURCES if hasattr(self, name))


def derived_fields(args: argparse.Namespace) -> dict[str, Any]:
    """Values of fields that are not flags but follow from flags (e.g. params_dtype from --bf16)."""
    import torch

    derived: dict[str, Any] = {}
    if hasattr(args, "bf16") or hasattr(args, "fp16"):
        if getattr(args, "bf16", False):
            derived["params_dtype"] = torch.bfloat16
        elif getattr(args, "fp16", False):
            derived["params_dtype"] = torch.float16
        else:
            derived["params_dtype"] = torch.float32
    return derived


def build_config(cls: type, args: argparse.Namespace, **overrides):
    """Instantiate dataclass `cls` from the namespace: each init field present in `args` is passed,
    derived fields (see `derived_fields`) are filled in, and `overrides` win over both."""
    init_fields = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in derived_fields(args).items() if k in init_fields}
    for name in init_fields:
        if hasattr(args, name):
            kwargs[name] = getattr(args, name)
    kwargs.update({k: v for k, v in overrides.items() if k in init_fields})
    return cls(**kwargs)


# Values that validation writes into the namespace; they are not settings (the run reads them from
# its groups), so they are kept out of `Configs.extra`.
_VALIDATION_RESULTS = ("world_size", "data_parallel_size", "num_microbatches", "yaml_cfg")


def configs_from_args(args: argparse.Namespace, classes: Optional[dict[str, type]] = None) -> Configs:
    """Build every config dataclass from a parsed (and validated) namespace. Each dataclass checks
    its own fields (`__post_init__`); the rules across configs are in gigatron/training/validate.py."""
    classes = config_classes() if classes is None else classes
    configs = Configs()
    owned: set[str] = set()
    for name, cls in classes.items():
        setattr(configs, name, build_config(cls, args))
        owned.update(f.name for f in dataclasses.fields(cls))
    configs.extra = {k: v for k, v in vars(args).items()
                     if not k.startswith("_") and k not in owned and k not in _VALIDATION_RESULTS}
    configs.world_size = getattr(args, "world_size", None)
    return configs


def args_dict_from_configs(configs: Configs, **values) -> dict[str, Any]:
    """The run's settings as one flat dict of flag values (field name -> value), as Megatron's
    checkpoints record `args`: every command-line field of every config, the script's extra flags,
    and `values` (e.g. padded_vocab_size). Settings with several homes (a core config that needs a
    copy of another's field) appear once; their values agree because one flag set them all."""
    specs, _ = flag_specs({name: type(config) for name, config in configs.items() if config is not None})
    flat: dict[str, Any] = {}
    for name, config in configs.items():
        if config is None:
            continue
        for f in dataclasses.fields(config):
            if f.name in specs and f.name not in flat:
                flat[f.name] = getattr(config, f.name)
    flat.update(configs.extra)
    flat.update(values)
    return flat


def explicit_flags(args: argparse.Namespace) -> frozenset:
    """The fields that the user set for this run (on the command line or in --yaml-cfg), as recorded
    by `parse_args`; empty for a namespace built another way."""
    return frozenset(getattr(args, "_explicit", ()) or ())
