"""Zero-shot GPT evaluation: WikiText perplexity and LAMBADA cloze accuracy.

Shape legend: b = micro-batch, s = sequence (--seq-length), V = true vocabulary, Vp = padded
vocabulary, tp = tensor-parallel size; the model's logits are vocab-parallel [s, b, Vp/tp].

Batches run through the pipeline schedules in forward-only mode, so any tensor / pipeline /
data-parallel layout evaluates the same way. Windows are dealt out to data-parallel ranks
(rank r takes micro-batch r of every group of dp micro-batches; the last group is padded with rows
whose mask is empty); the sums (token NLL, counted targets, correct passages, passages) are
added over data-parallel ranks on the last pipeline stage and then shared with every rank.
The padded vocabulary entries (ids V .. Vp-1) get logit -inf: they never receive probability
and are never the argmax.
"""

from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from gigatron.core.parallel.cross_entropy import vocab_parallel_cross_entropy

__all__ = [
    "mask_padded_vocab",
    "true_vocab_nll",
    "true_vocab_argmax",
    "batches_for_rank",
    "evaluate_sums",
    "wikitext_results",
    "lambada_results",
    "format_results",
]


# ------------------------------------------------------------------ logits over the true vocabulary


def mask_padded_vocab(logits: torch.Tensor, vocab_size: int, tp) -> torch.Tensor:
    """Vocab-parallel logits [s, b, Vp/tp] with the columns of ids >= `vocab_size` set to -inf
    (a copy when any column of this shard is padding)."""
    shard = logits.shape[-1]
    start = tp.rank * shard
    keep = vocab_size - start  # columns of this shard below the true vocabulary size
    if keep >= shard:
        return logits
    if keep <= 0:
        return torch.full_like(logits, float("-inf"))
    masked = logits.clone()
    masked[..., keep:] = float("-inf")
    return masked


def true_vocab_nll(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, tp) -> torch.Tensor:
    """Negative log-likelihood [s, b] (fp32) of `targets` [s, b] under the softmax over the true
    vocabulary of vocab-parallel `logits` [s, b, Vp/tp]."""
    return vocab_parallel_cross_entropy(mask_padded_vocab(logits, vocab_size, tp), targets, tp)


def true_vocab_argmax(logits: torch.Tensor, vocab_size: int, tp) -> torch.Tensor:
    """Greedy token ids [s, b] over the true vocabulary of vocab-parallel `logits` [s, b, Vp/tp].

    Each rank takes its shard's maximum; the maxima and their global ids [s, b] are gathered over
    tp and the largest wins (ties go to the lowest id, as torch.argmax over the full row)."""
    masked = mask_padded_vocab(logits, vocab_size, tp).float()
    local_max, local_index = masked.max(dim=-1)  # [s, b], [s, b]
    global_index = local_index + tp.rank * logits.shape[-1]  # [s, b]
    if tp.size == 1:
        return global_index
    maxima = [torch.empty_like(local_max) for _ in range(tp.size)]
    indices = [torch.empty_like(global_index) for _ in range(tp.size)]
    dist.all_gather(maxima, local_max.contiguous(), group=tp.group)
    dist.all_gather(indices, global_index.contiguous(), group=tp.group)
    maxima_t = torch.stack(maxima)  # [tp, s, b]
    indices_t = torch.stack(indices)  # [tp, s, b]
    best_rank = maxima_t.argmax(dim=0, keepdim=True)  # [1, s, b]; first (lowest-id) rank on ties
    return indices_t.gather(0, best_rank).squeeze(0)  # [s, b]


# ------------------------------------------------------------------ batching


def _empty_row(sample: dict) -> dict:
    return {"text": np.zeros_like(sample["text"]), "pad_mask": np.zeros_like(sample["pad_mask"]),
            "valid": np.float32(0.0)}


def batches_for_rank(dataset, micro_batch_size: int, dp_rank: int, dp_size: int) -> list[dict]:
    """This data-parallel rank's micro-batches, as tensors {"text" [b, s+1], "pad_mask" [b, s],
    "valid" [b]}: every rank gets the same number of full micro-batches; missing rows are empty."""
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("the evaluation set is empty")
    per_group = micro_batch_size * dp_size
    num_batches = math.ceil(num_samples / per_group)
    template = dataset[0]
    batches = []
    for batch_index in range(num_batches):
        rows = []
        for slot in range(micro_batch_size):
            index = batch_index * per_group + dp_rank * micro_batch_size + slot
            if index < num_samples:
                rows.append({**dataset[index], "valid": np.float32(1.0)})
            else:
                rows.append(_empty_row(template))
        batches.append({key: torch.from_numpy(np.stack([row[key] for row in rows])) for key in rows[0]})
    return batches


# ------------------------------------------------------------------ the evaluation pass


def _unwrap(model):
    return getattr(model, "module", model)


def _sums_loss_func(metric: str, batch: dict, vocab_size: int, tp):
    """loss_func for the schedules: the micro-batch's sums as the logging dict {"sums": [2]}."""

    def loss_func(logits: torch.Tensor):
        labels = batch["text"][:, 1:].to(logits.device).transpose(0, 1).contiguous()  # [b, s] -> [s, b]
        mask = batch["pad_mask"].to(logits.device).float().transpose(0, 1)  # [s, b]
        if metric == "loss":
            nll = true_vocab_nll(logits, labels, vocab_size, tp)  # [s, b]
            sums = torch.stack([(nll * mask).sum(), mask.sum()])
        else:
            predicted = true_vocab_argmax(logits, vocab_size, tp)  # [s, b]
            hits = (predicted == labels) | (mask == 0)  # [s, b]
            valid = batch["valid"].to(logits.device).float()  # [b]
            correct = hits.all(dim=0).float() * valid  # [b]
            sums = torch.stack([correct.sum(), valid.sum()])
        # Forward only: the schedule's loss is not used; the sums travel in the logging dict.
        return torch.zeros(1, device=logits.device), {"sums": sums.double()}

    return loss_func


def evaluate_sums(model_chunks: Sequence[torch.nn.Module], dataset, metric: str, *, groups, config,
                  micro_batch_size: int, vocab_size: int, device) -> torch.Tensor:
    """Forward-only pass over `dataset`; returns float64 [2] on every rank:
    metric "loss": [sum of target NLL, number of counted targets];
    metric "accuracy": [passages whose every target token is the argmax, passages]."""
    from gigatron.core.pipeline import get_forward_backward_func

    if metric not in ("loss", "accuracy"):
        raise ValueError(f"unknown metric {metric!r}; use 'loss' or 'accuracy'")
    chunks = list(model_chunks)
    batches = batches_for_rank(dataset, micro_batch_size, groups.dp.rank, groups.dp.size)
    seq_length = batches[0]["pad_mask"].shape[1]
    forward_backward = get_forward_backward_func(groups.pp.size, groups.vp_size)
    tp = groups.tp

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        inner = _unwrap(model)
        tokens = batch["text"][:, :-1].to(device) if inner.pre_process else None  # [b, s]
        output = model(tokens, None, None)  # logits [s, b, Vp/tp] on the last stage
        return output, _sums_loss_func(metric, batch, vocab_size, tp)

    if len(chunks) > 1 and len(batches) % groups.pp.size:
        # The interleaved schedule takes micro-batches in groups of pp: pad with empty batches.
        empty = {key: torch.zeros_like(value) for key, value in batches[0].items()}
        batches += [empty] * (groups.pp.size - len(batches) % groups.pp.size)
    for chunk in chunks:
        chunk.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        iterators = [iter(batches) for _ in chunks]
        results = forward_backward(
            forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks if len(chunks) > 1 else chunks[0], num_microbatches=len(batches), seq_length=seq_length,
            micro_batch_size=micro_batch_size, groups=groups, config=config, forward_only=True)
        for entry in results:
            totals += entry["sums"].to(device)
    if groups.dp.group is not None:
        dist.all_reduce(totals, group=groups.dp.group)
    if groups.pp.group is not None:
        # Only the last stage holds the sums; the others add zeros.
        if not groups.is_pipeline_last_stage():
            totals.zero_()
        dist.all_reduce(totals, group=groups.pp.group)
    return totals


# ------------------------------------------------------------------ metrics


def wikitext_results(nll_sum: float, num_counted: float, num_tokenized_tokens: int,
                     num_original_tokens: int) -> dict:
    """Megatron's perplexity figures from the summed NLL of all targets.

    loss = nll_sum / (T - 1); ppl = exp(min(20, loss)); token_ratio = (T - 1) / (W - 1) for T
    tokens and W original (whitespace) words; adjusted ppl = exp(min(20, loss * token_ratio))."""
    num_targets = num_tokenized_tokens - 1
    if round(num_counted) != num_targets:
        raise RuntimeError(f"the windows counted {num_counted} targets but the text has {num_targets}")
    if num_original_tokens < 2:
        raise ValueError(f"the evaluation text has {num_original_tokens} word(s); adjusted perplexity needs 2 or more")
    loss = nll_sum / num_targets
    token_ratio = num_targets / (num_original_tokens - 1)
    return {
        "avg_loss": loss,
        "ppl": math.exp(min(20.0, loss)),
        "adjusted_ppl": math.exp(min(20.0, loss * token_ratio)),
        "token_ratio": token_ratio,
        "num_tokenized_tokens": int(num_tokenized_tokens),
        "num_original_tokens": int(num_original_tokens),
    }


def lambada_results(num_correct: float, num_examples: float) -> dict:
    """Cloze accuracy: passages whose whole target is predicted greedily / passages."""
    return {"number_correct": int(round(num_correct)), "total_examples": int(round(num_examples)),
            "avg_accuracy": num_correct / num_examples if num_examples else float("nan")}


def format_results(task: str, results: dict) -> str:
    """A two-column table of the results."""
    width = max(len(k) for k in results)
    lines = [f" validation results on {task}", " " + "-" * (width + 20)]
    for key, value in results.items():
        shown = f"{value:.6f}" if isinstance(value, float) else str(value)
        lines.append(f" {key:<{width}} | {shown}")
    return "\n".join(lines)


# ------------------------------------------------------------------ the task driver


def _build_model(ctx) -> list:
    from gigatron.training.gpt import model_provider

    groups = ctx.groups
    chunks = []
    for vp_stage in range(groups.vp_size or 1):
        stage = vp_stage if groups.vp_size is not None else None
        module = model_provider(ctx, groups.is_pipeline_first_stage(stage), groups.is_pipeline_last_stage(stage),
                                stage)
        chunks.append(module.to(ctx.device))
    return chunks


def _load_weights(ctx, chunks) -> Optional[dict]:
    """Load --load into the chunks; returns {"checkpoint", "iteration"} or None without --load."""
    from gigatron.training.checkpointing import load_checkpoint, read_tracker
    from gigatron.training.logging import print_rank_0

    checkpoint = ctx.configs.checkpoint
    if not checkpoint.load:
        print_rank_0("WARNING: no --load given: evaluating a randomly initialized model")
        return None
    loaded = load_checkpoint(checkpoint.load, chunks, None, None, ctx.groups, ckpt_step=checkpoint.ckpt_step,
                             load_optim=False, load_rng=False, exit_on_missing_checkpoint=True)
    iteration = checkpoint.ckpt_step if checkpoint.ckpt_step is not None else read_tracker(checkpoint.load)[0]
    print_rank_0(f"> loaded {loaded.path}")
    return {"checkpoint": os.path.abspath(checkpoint.load), "iteration": iteration}


def run(args, task) -> dict:
    """Evaluate `task` (a TaskConfig: WIKITEXT103 or LAMBADA) on each --valid-data file; print the
    results, write them (rank 0) to --results-path or beside the --load checkpoint (never over an
    existing file) and return {file: results}."""
    from tasks.eval_utils import initialize_task, results_path, write_results_file
    from tasks.zeroshot_gpt.datasets import build_lambada_dataset, build_wikitext_dataset
    from gigatron.training.logging import print_rank_0

    ctx = initialize_task(args, task)
    chunks = _build_model(ctx)
    source = _load_weights(ctx, chunks)
    seq_length = ctx.configs.data.seq_length
    mbs = task.eval_micro_batch_size or ctx.configs.training.micro_batch_size
    all_results = {}
    for path in task.valid_data:
        if task.task == "WIKITEXT103":
            dataset, corpus = build_wikitext_dataset(path, ctx.tokenizer, seq_length, task.overlapping_eval)
            sums = evaluate_sums(chunks, dataset, "loss", groups=ctx.groups, config=ctx.configs.transformer,
                                 micro_batch_size=mbs, vocab_size=ctx.tokenizer.vocab_size, device=ctx.device)
            results = wikitext_results(float(sums[0]), float(sums[1]), corpus.num_tokenized_tokens,
                                       corpus.num_original_tokens)
            results["overlapping_eval"] = task.overlapping_eval
        elif task.task == "LAMBADA":
            dataset = build_lambada_dataset(path, ctx.tokenizer, seq_length, task.strict_lambada)
            sums = evaluate_sums(chunks, dataset, "accuracy", groups=ctx.groups, config=ctx.configs.transformer,
                                 micro_batch_size=mbs, vocab_size=ctx.tokenizer.vocab_size, device=ctx.device)
            results = lambada_results(float(sums[0]), float(sums[1]))
            results["strict_lambada"] = bool(task.strict_lambada)
        else:
            raise ValueError(f"--task {task.task} is not a zero-shot GPT task (WIKITEXT103, LAMBADA)")
        results["seq_length"] = seq_length
        print_rank_0(format_results(f"{task.task} ({path})", results))
        all_results[os.path.abspath(path)] = results
    destination = results_path(task, source["checkpoint"] if source else None)
    if destination is None:
        print_rank_0("> results are not written (no --load checkpoint; give --results-path FILE to keep them)")
    elif ctx.run.rank == 0:
        record = {"task": task.task, **(source or {"checkpoint": None}), "results": all_results}
        written = write_results_file(destination, record)
        if written != destination:
            print(f"> {destination} exists and is kept; results written to {written}", flush=True)
        else:
            print(f"> results written to {written}", flush=True)
    return all_results
