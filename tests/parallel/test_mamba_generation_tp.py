"""Generation from a hybrid Mamba model with tensor parallelism (2 gloo ranks: Mamba heads and
groups, attention heads and the vocabulary split over the ranks, each rank caching the recurrent
states of its own heads) equals the one-process engine on the same (layout-independently
initialized) model: every step's logits, greedy tokens, log-probabilities and seeded sampling."""

import os
import sys

import pytest
import torch

from gigatron.core.inference.engine import InferenceEngine, SamplingParams
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.parallel.random import model_parallel_seed
from tests.parallel.harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "unit"))
from test_mamba_generation import PROMPTS, TOK, cached_greedy, hybrid_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GREEDY = SamplingParams(tokens_to_generate=8, top_k=1, stop_at_eod=False, return_log_probs=True)
SAMPLED = SamplingParams(tokens_to_generate=8, top_p=0.9, temperature=0.9, random_seed=4, stop_at_eod=False,
                         return_log_probs=True)


def _generations(engine):
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    out = [cached_greedy(engine, prompts, 6)]
    for params in (GREEDY, SAMPLED):
        r = engine.generate_tokens(prompts, params)
        out.append((r.tokens, torch.tensor([lp[-8:] for lp in r.logprobs])))
    return out


def _worker(rank, world_size):
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model_parallel_seed(1234, groups)
    model = hybrid_model("M*M-", seed=9, groups=groups, tp=world_size)
    assert model.decoder.layers[0].mixer.num_heads == 4  # 8 Mamba heads, 4 on each rank
    return _generations(InferenceEngine(model, TOK, groups=groups, max_batch_size=4, max_sequence_length=64))


def test_tp2_hybrid_generation_equals_tp1():
    reference = _generations(InferenceEngine(hybrid_model("M*M-", seed=9), TOK, max_batch_size=4,
                                             max_sequence_length=64))
    results = run_distributed(_worker, 2)
    for result in results:  # both ranks hold the same sequences
        for (tokens, values), (ref_tokens, ref_values) in zip(result, reference):
            assert tokens == ref_tokens
            torch.testing.assert_close(values, ref_values, rtol=1e-5, atol=1e-5)
