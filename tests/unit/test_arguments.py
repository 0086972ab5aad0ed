"""The parser generated from the config dataclasses."""

import dataclasses
import textwrap
from typing import Literal, Optional

import pytest
import torch

from gigatron.training import arguments as A
from gigatron.training.config import CheckpointConfig, LoggingConfig, TrainingConfig


@dataclasses.dataclass
class _Toy:
    count: int = 3
    """How many."""
    rate: Optional[float] = None
    """A rate."""
    mode: Literal["a", "b"] = "a"
    """Which mode."""
    fused: bool = True
    """Use the fused path."""
    names: Optional[list[str]] = None
    """Some names."""
    dtype: torch.dtype = torch.float32
    """Derived, not a flag."""


TOY = {"toy": _Toy, "training": TrainingConfig}


def test_every_field_of_every_config_has_a_flag_and_help():
    specs, conflicts = A.flag_specs()
    assert conflicts == []
    derived = {"params_dtype"}  # set from --bf16/--fp16 by derived_fields
    for name, cls in A.config_classes().items():
        for f in dataclasses.fields(cls):
            if not f.init or f.name in derived:
                continue
            assert f.name in specs, f"{name}.{f.name} has no flag"
            assert specs[f.name].help, f"{name}.{f.name} has no docstring"
    parser = A.build_parser()
    replaced = {alias.dest: option for option, alias in A.ALIASES.items() if alias.replaces}
    for spec in specs.values():
        if spec.dest in replaced:  # Megatron's spelling is the field's only flag
            assert replaced[spec.dest] in parser._option_string_actions
            assert not any(option in parser._option_string_actions for option in spec.option_strings)
            continue
        for option in spec.option_strings:
            assert option in parser._option_string_actions


def test_megatron_spellings_replace_gigatron_only_flags():
    args = A.parse_args(["--ddp-bucket-size", "1000", "--ddp-average-in-collective",
                         "--ddp-pad-buckets-for-high-nccl-busbw", "--use-tp-pp-dp-mapping"])
    assert args.bucket_size == 1000 and args.average_in_collective and args.pad_buckets_for_high_nccl_busbw
    assert args.order == "tp-cp-ep-pp-dp"
    assert A.parse_args([]).order == "tp-cp-ep-dp-pp"
    for option in ("--bucket-size", "--average-in-collective", "--pad-buckets-for-high-nccl-busbw"):
        with pytest.raises(SystemExit):
            A.parse_args([option, "1"] if option == "--bucket-size" else [option])


def test_help_texts_are_true():
    """--order is a Gigatron addition beside Megatron's --use-tp-pp-dp-mapping (which the parser
    accepts); --check-for-nan-in-grad does not claim to be fed by --check-for-nan-in-loss-and-grad."""
    help_text = " ".join(A.build_parser().format_help().split())
    assert "--use-tp-pp-dp-mapping" in A.build_parser()._option_string_actions
    specs, _ = A.flag_specs()
    assert "Gigatron addition" in specs["order"].help and "--use-tp-pp-dp-mapping" in specs["order"].help
    assert "fed to this field" not in specs["check_for_nan_in_grad"].help
    assert "does not turn this on" in specs["check_for_nan_in_grad"].help
    assert "Lay ranks out in Megatron's tp-pp-dp order" in help_text


def test_each_setting_is_defined_once():
    """A field that two configs need is defined in one class (a shared base both inherit: tp/pp/vp/sp,
    bf16/fp16/params_dtype, seq_length, use_distributed_optimizer), never written twice."""

    def defining_class(cls, name):
        return next(k for k in cls.__mro__ if name in k.__dict__.get("__annotations__", {}))

    homes = {}
    for owner, cls in A.config_classes().items():
        for f in dataclasses.fields(cls):
            home = defining_class(cls, f.name)
            assert homes.setdefault(f.name, home) is home, \
                f"{f.name} is defined in {homes[f.name].__name__} and again in {home.__name__} ({owner})"


def test_help_text_comes_from_docstrings():
    docs = A.field_docstrings(TrainingConfig)
    assert docs["eval_interval"] == "Interval between runs of evaluation on the validation set, in iterations."
    help_text = A.build_parser(TOY).format_help()
    assert "How many." in help_text and "Which mode." in help_text


def test_a_parser_built_again_reads_no_source(monkeypatch):
    """Every parse_args builds a parser: the classes' source is read and parsed once per process
    (it was most of parse_args' time), and the help text stays the docstrings."""
    import inspect

    A.build_parser(TOY)
    read = []
    getsource = inspect.getsource
    monkeypatch.setattr(A.inspect, "getsource", lambda obj: read.append(obj) or getsource(obj))
    help_text = A.build_parser(TOY).format_help()
    assert read == [] and "How many." in help_text
    docs = A.field_docstrings(_Toy)
    docs["count"] = "changed by a caller"
    assert A.field_docstrings(_Toy)["count"] == "How many."  # callers get their own copy


def test_types_defaults_and_bool_forms():
    args = A.parse_args([], classes=TOY)
    assert args.count == 3 and args.rate is None and args.mode == "a" and args.fused is True
    assert not hasattr(args, "dtype")
    args = A.parse_args(["--count", "5", "--rate", "0.5", "--mode", "b", "--no-fused", "--names", "x", "y"], classes=TOY)
    assert (args.count, args.rate, args.mode, args.fused, args.names) == (5, 0.5, "b", False, ["x", "y"])
    with pytest.raises(SystemExit):
        A.parse_args(["--mode", "c"], classes=TOY)
    with pytest.raises(SystemExit):
        A.parse_args(["--count", "x"], classes=TOY)


def test_megatron_defaults():
    args = A.parse_args([])
    assert args.seed == 1234 and args.eval_interval == 1000 and args.eval_iters == 100
    assert args.log_interval == 100 and args.init_method_std == 0.02 and args.lr_decay_style == "linear"
    assert args.tensor_model_parallel_size == 1 and args.make_vocab_size_divisible_by == 128
    assert args.add_bias_linear is True and args.check_for_nan_in_loss_and_grad is True


def test_aliases():
    args = A.parse_args(["--disable-bias-linear", "--ddp-bucket-size", "1000", "--recompute-activations",
                         "--accumulate-allreduce-grads-in-fp32", "--no-create-attention-mask-in-dataloader",
                         "--override-opt_param-scheduler", "--num-virtual-stages-per-pipeline-rank", "2",
                         "--use-mcore-models", "--no-masked-softmax-fusion"])
    assert args.add_bias_linear is False
    assert args.bucket_size == 1000
    assert args.recompute_granularity == "selective"
    assert args.grad_reduce_in_fp32 is True
    assert args.create_attention_mask_in_dataloader is False
    assert args.override_opt_param_scheduler is True
    assert args.virtual_pipeline_model_parallel_size == 2
    assert not any(k.startswith("_accepted_") for k in vars(args))
    specs, _ = A.flag_specs()
    for option, alias in A.ALIASES.items():
        assert alias.dest in specs, f"alias {option} names unknown field {alias.dest}"


def test_unknown_flag_is_an_error_with_a_suggestion(capsys):
    with pytest.raises(SystemExit):
        A.parse_args(["--micro-batch-sise", "2"])
    err = capsys.readouterr().err
    assert "--micro-batch-sise" in err and "--micro-batch-size" in err
    with pytest.raises(SystemExit):  # no prefix matching
        A.parse_args(["--micro-batch", "2"])
    with pytest.raises(SystemExit):  # a Megatron flag Gigatron does not implement
        A.parse_args(["--tp-comm-overlap"])


def test_yaml_cfg(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent("""\
        micro-batch-size: 4
        model:
          num_layers: 3
          hidden_size: 64
        lr: 0.001
    """))
    args = A.parse_args(["--yaml-cfg", str(path), "--hidden-size", "32"])
    assert args.micro_batch_size == 4 and args.num_layers == 3 and args.lr == 0.001
    assert args.hidden_size == 32  # the command line wins
    path.write_text("num_layerz: 3\n")
    with pytest.raises(ValueError, match="num_layerz.*num_layers"):
        A.parse_args(["--yaml-cfg", str(path)])


def test_configs_from_args_builds_every_dataclass():
    args = A.parse_args(["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                         "--seq-length", "16", "--max-position-embeddings", "16", "--micro-batch-size", "2",
                         "--lr", "1e-3", "--bf16", "--mock-data", "--save", "/tmp/x", "--log-interval", "5"])
    configs = A.configs_from_args(args)
    assert configs.transformer.num_layers == 2 and configs.transformer.params_dtype == torch.bfloat16
    assert configs.optimizer.bf16 and configs.optimizer.params_dtype == torch.bfloat16
    assert configs.data.mock_data and configs.data.seq_length == 16
    assert configs.training.micro_batch_size == 2
    assert configs.checkpoint.save == "/tmp/x" and configs.logging.log_interval == 5
    assert configs.parallel.tensor_model_parallel_size == 1
    assert isinstance(configs.checkpoint, CheckpointConfig) and isinstance(configs.logging, LoggingConfig)


def test_the_training_layer_reads_configs_not_the_namespace():
    """After configs_from_args nothing in the training loop, its start-up and the providers reads the
    parsed flags: no `ctx.args` / `self.args` attribute reads."""
    import ast
    import importlib
    import inspect

    for name in ("loop", "initialize", "logging", "profiling", "gpt", "bert", "t5"):
        module = importlib.import_module(f"gigatron.training.{name}")
        tree = ast.parse(inspect.getsource(module))
        reads = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, ast.Attribute) and node.attr == "args" and isinstance(node.ctx, ast.Load)
                 and isinstance(node.value, ast.Name) and node.value.id in ("ctx", "self")]
        assert reads == [], f"gigatron/training/{name}.py reads ctx.args at lines {reads}"
    from gigatron.training.loop import TrainContext

    assert "args" not in {f.name for f in dataclasses.fields(TrainContext)}, "the run context keeps no Namespace"
