"""Zero-shot evaluation on two gloo ranks (tp=2, dp=2, pp=2, pp=2 with virtual stages) equals one process.

The model has a true vocabulary of 50 padded to 64, so with tp=2 the second rank's shard holds the
padded entries: masking them must give the one-process numbers. WikiText NLL sums and LAMBADA
correct counts must match the single-process evaluation.
"""

import pytest
import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig
from tasks.zeroshot_gpt.datasets import LambadaDataset, LMWindowDataset
from tasks.zeroshot_gpt.evaluate import evaluate_sums
from tests.parallel.harness import run_distributed

VOCAB, PADDED, SEED, MBS = 50, 64, 9, 2
LAYOUTS = {
    "tp2": dict(tensor_model_parallel_size=2),
    "dp2": dict(),
    "pp2": dict(pipeline_model_parallel_size=2),
    "pp2_vp2": dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
}


def _config(**kw):
    return TransformerConfig(num_layers=4, hidden_size=16, num_attention_heads=2, seq_length=8,
                             attention_dropout=0.0, hidden_dropout=0.0, use_cpu_initialization=True, **kw)


def _datasets():
    g = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, VOCAB, (61,), generator=g).tolist()
    windows = LMWindowDataset(tokens, 8, pad_id=0, stride=3)
    samples = []
    for i in range(7):
        ids = torch.randint(0, VOCAB, (5,), generator=g).tolist()
        samples.append((ids[:4 - i % 2], ids[4 - i % 2:]))
    # A model with sharper predictions makes some passages right: take the targets from its own argmax.
    return windows, samples


def _chunks(config, groups):
    chunks = []
    vp = groups.vp_size
    for chunk in range(vp or 1):
        stage = chunk if vp else None
        chunks.append(GPTModel(config, groups, PADDED, seed=SEED, pre_process=groups.is_pipeline_first_stage(stage),
                               post_process=groups.is_pipeline_last_stage(stage), vp_stage=stage))
    return chunks


def _evaluate(chunks, groups, config, lambada):
    windows, _ = _datasets()
    kw = dict(groups=groups, config=config, micro_batch_size=MBS, vocab_size=VOCAB, device=torch.device("cpu"))
    return evaluate_sums(chunks, windows, "loss", **kw), evaluate_sums(chunks, lambada, "accuracy", **kw)


def _lambada_from_model(model):
    """Passages whose target is partly the reference model's greedy prediction, so that the count
    of correct passages is neither 0 nor all."""
    _, samples = _datasets()
    fixed = []
    with torch.no_grad():
        for i, (context, target) in enumerate(samples):
            if i % 2 == 0:
                logits = model(torch.tensor([context]))[..., :VOCAB]  # [s, 1, V]
                target = [int(logits[-1, 0].argmax())]
            fixed.append((context, target))
    return fixed


def _worker(rank, world_size, lambada_samples):
    torch.set_num_threads(1)
    results = {}
    for name, layout in LAYOUTS.items():
        groups = ParallelGroups.build(ParallelConfig(**layout))
        config = _config(**{k: v for k, v in layout.items()})
        lambada = LambadaDataset(lambada_samples, 8, pad_id=0)
        results[name] = _evaluate(_chunks(config, groups), groups, config, lambada)
    return results


def test_zeroshot_evaluation_parallel_equals_single_process():
    torch.set_num_threads(1)
    single = ParallelGroups.single()
    config = _config()
    reference = GPTModel(config, single, PADDED, seed=SEED).eval()
    lambada_samples = _lambada_from_model(reference)
    ref_loss, ref_acc = _evaluate([reference], single, config, LambadaDataset(lambada_samples, 8, pad_id=0))
    assert 0 < float(ref_acc[0]) < float(ref_acc[1]) == len(lambada_samples)
    results = run_distributed(_worker, 2, lambada_samples, timeout=300)
    for rank, per_layout in enumerate(results):
        for name, (loss, acc) in per_layout.items():
            torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, msg=f"{name} rank {rank}")
            assert torch.equal(acc, ref_acc), f"{name} rank {rank}: {acc} vs {ref_acc}"


# ------------------------------------------------------------------ fine-tuning, data parallel


def _finetune_worker(rank, world_size, flags, save_dir):
    from tests.unit.test_tasks_finetune import TinyEncoder
    from tasks.main import parse_task_args, run_finetune

    torch.set_num_threads(1)
    args, _ = parse_task_args(flags + ["--save", save_dir, "--ckpt-format", "torch"])
    result = run_finetune(args, encoder_provider=lambda ctx: TinyEncoder(ctx.padded_vocab_size, 16))
    return result.iteration, result.accuracies, result.train_losses


def test_finetuning_data_parallel_equals_single_process(tmp_path):
    """dp=2 (micro-batch 4, the last, incomplete batch kept: one rank then holds no real sample)
    trains the same weights as one process with micro-batch 8, and as one process with
    micro-batch 4 and two accumulated micro-batches per step."""
    from tests.unit.test_tasks_finetune import _bert_vocab, _head_weights, _synthetic_mnli

    train = _synthetic_mnli(tmp_path / "train.tsv", 20, seed=0)
    dev = _synthetic_mnli(tmp_path / "dev.tsv", 7, seed=1)
    flags = ["--task", "MNLI", "--train-data", train, "--valid-data", dev, "--num-layers", "1", "--hidden-size", "16",
             "--num-attention-heads", "2", "--seq-length", "24", "--max-position-embeddings", "24",
             "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file", _bert_vocab(), "--lr", "0.02",
             "--hidden-dropout", "0", "--attention-dropout", "0", "--epochs", "2", "--keep-last",
             "--distributed-backend", "gloo", "--log-interval", "1000"]
    runs = {
        "dp2": (2, ["--micro-batch-size", "4"]),
        "dp1": (1, ["--micro-batch-size", "8"]),
        "dp1_accumulate": (1, ["--micro-batch-size", "4", "--global-batch-size", "8"]),
    }
    outcomes = {}
    for name, (world, extra) in runs.items():
        if world == 1:
            outcomes[name] = [_finetune_worker(0, 1, flags + extra, str(tmp_path / name))]
        else:
            outcomes[name] = run_distributed(_finetune_worker, world, flags + extra, str(tmp_path / name), timeout=300)
    reference_iteration, reference_state = _head_weights(str(tmp_path / "dp1"))
    assert reference_iteration == 2 * 3
    for name in ("dp2", "dp1_accumulate"):
        iteration, state = _head_weights(str(tmp_path / name))
        assert iteration == reference_iteration
        for key in reference_state:
            torch.testing.assert_close(state[key], reference_state[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        for rank_outcome in outcomes[name]:
            assert rank_outcome[1] == outcomes["dp1"][0][1]  # the same accuracies on every rank
            assert rank_outcome[2] == pytest.approx(outcomes["dp1"][0][2], rel=1e-5)
