"""A HuggingFace model converted to tensor parallel size 2 and loaded by two gloo ranks through the
training engine's --use-checkpoint-args / --load path gives HuggingFace's logits (the
vocab-parallel logits gathered over the tensor-parallel group)."""

import pytest
import torch
import torch.distributed as dist

from tests.parallel.harness import run_distributed
from tests.unit._hf_fixtures import VOCAB, make_hf_model, run_convert


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tp_logits(rank, world_size, ckpt, ids):
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.training.arguments import build_config, parse_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint

    args = parse_args(["--load", ckpt, "--use-checkpoint-args", "--num-layers", "1", "--hidden-size", "8",
                       "--num-attention-heads", "2", "--micro-batch-size", "1",
                       "--tensor-model-parallel-size", str(world_size)])  # the layout is the run's
    load_args_from_checkpoint(args)
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=args.tensor_model_parallel_size))
    padded = vocab_size_with_padding(build_tokenizer(args).vocab_size, args.make_vocab_size_divisible_by,
                                     groups.tp.size)
    config = build_config(TransformerConfig, args, attention_dropout=0.0, hidden_dropout=0.0,
                          perform_initialization=False, use_cpu_initialization=True)
    model = GPTModel(config, groups, padded)
    load_checkpoint(ckpt, [model], None, None, groups)
    model.eval()
    local = model(ids).detach()  # [s, b, Vp/tp]
    parts = [torch.empty_like(local) for _ in range(groups.tp.size)]
    dist.all_gather(parts, local, group=groups.tp.group)
    return torch.cat(parts, dim=-1).transpose(0, 1)[..., :VOCAB]  # [b, s, V]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tp2_logits_match_hf(tmp_path, family):
    hf = make_hf_model(family, tmp_path / "hf", seed=11)
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", "2")
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf(ids).logits
    results = run_distributed(_tp_logits, 2, str(tmp_path / "ckpt"), ids)
    for logits in results:
        torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
