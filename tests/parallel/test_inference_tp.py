"""Generation with tensor parallelism (2 gloo ranks) equals generation with one process.

Rank 0 serves: it batches requests through a LeaderRunner, which broadcasts each command; rank 1
runs follower_loop and joins every generation. Greedy tokens, log-probabilities, seeded sampling
and beam search must equal the tp=1 engine on the same (layout-independently initialized) model.
"""

import os
import sys

import pytest
import torch

from gigatron.core.inference.broadcast import LeaderRunner, follower_loop
from gigatron.core.inference.engine import InferenceEngine, SamplingParams
from gigatron.core.parallel.config import ParallelConfig
from gigatron.core.parallel.groups import ParallelGroups
from tests.parallel.harness import run_distributed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "unit"))
from _inference_fixtures import CharTokenizer, tiny_model  # noqa: E402

TOK = CharTokenizer()
MODEL = dict(position_embedding_type="rope", num_query_groups=2, group_query_attention=True, swiglu=True,
             normalization="RMSNorm", add_bias_linear=False)
PROMPTS = ["hello", "a cat: the", "xy"]
GREEDY = SamplingParams(tokens_to_generate=10, top_k=1, return_log_probs=True)
ENDED = SamplingParams(tokens_to_generate=10, top_k=1, stop_at_eod=False)  # rows end by the callback only
SAMPLED = SamplingParams(tokens_to_generate=10, top_p=0.9, temperature=0.9, random_seed=4, return_log_probs=True,
                         stop_at_eod=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(engine_or_runner):
    out = []
    for params in (GREEDY, SAMPLED):
        prompt_tokens = [TOK.tokenize(p) for p in PROMPTS]
        r = engine_or_runner.generate_tokens(prompt_tokens, params)
        out.append((r.tokens, r.logprobs))
    b = engine_or_runner.beam_search_tokens(TOK.tokenize("ab"), 4, 3, 0, 1.0)
    out.append((b.tokens, b.scores))
    return out


def _tp_worker(rank, world_size, lead):
    """Every rank builds the tensor-parallel engine; rank 0 returns lead(LeaderRunner) and shuts the
    runner down, the other ranks run follower_loop (returning how many commands they ran)."""
    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=world_size))
    model = tiny_model(seed=9, groups=groups, tensor_model_parallel_size=world_size, **MODEL)
    engine = InferenceEngine(model, TOK, groups=groups, max_batch_size=4)
    if rank == 0:
        runner = LeaderRunner(engine)
        try:
            return lead(runner)
        finally:
            runner.shutdown()
    return follower_loop(engine)


def _lead_generations(runner):
    # A bad request fails on every rank before any collective; the loop carries on.
    with pytest.raises(ValueError):
        runner.generate_tokens([[1, 2]], SamplingParams(tokens_to_generate=0))
    return _run(runner)


def test_tp2_generation_equals_tp1():
    reference = _run(InferenceEngine(tiny_model(seed=9, **MODEL), TOK, max_batch_size=4))
    results = run_distributed(_tp_worker, 2, _lead_generations)
    assert results[1] == 4  # the follower ran the failing command and the four generations
    for (tokens, values), (ref_tokens, ref_values) in zip(results[0], reference):
        assert tokens == ref_tokens
        for a, b in zip(values, ref_values):
            torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=1e-4, atol=1e-4)


def _ends_rows(step, tokens, active):
    """A serving callback (e.g. a stop string found): ends row 0 after step 1 and row 2 after step 3."""
    return [step == 1, False, step == 3]


def _lead_ended_rows(runner):
    return runner.generate_tokens([TOK.tokenize(p) for p in PROMPTS], ENDED, _ends_rows).tokens


def test_tp2_rows_ended_by_the_serving_callback_end_on_every_rank():
    """Only the serving rank has the callback; the other rank follows its choice and leaves the
    loop after the same step (else its next collective would meet the leader's next command)."""
    reference = InferenceEngine(tiny_model(seed=9, **MODEL), TOK, max_batch_size=4).generate_tokens(
        [TOK.tokenize(p) for p in PROMPTS], ENDED, _ends_rows).tokens
    assert [len(t) - len(p) for t, p in zip(reference, PROMPTS)] == [2, 10, 4]
    results = run_distributed(_tp_worker, 2, _lead_ended_rows)
    assert results[1] == 1
    assert results[0] == reference


class _Withdraws:
    """A serving rank's cancelled(): row 1's client leaves after step 2, every client after step 5."""

    def __init__(self):
        self.calls = 0

    def __call__(self):
        step, self.calls = self.calls, self.calls + 1
        if step >= 5:
            return [True, True, True]
        return [False, True, False] if step >= 2 else None


def _lead_withdrawn_rows(runner):
    first = runner.generate_tokens([TOK.tokenize(p) for p in PROMPTS], ENDED, None, _Withdraws()).tokens
    return first, runner.generate_tokens([TOK.tokenize(p) for p in PROMPTS], GREEDY).tokens


def test_tp2_withdrawn_rows_end_on_every_rank():
    """A withdrawn request's rows end on every rank (only the serving rank knows), and a generation
    whose rows are all withdrawn stops there on every rank: the next command runs normally."""
    engine = InferenceEngine(tiny_model(seed=9, **MODEL), TOK, max_batch_size=4)
    prompts = [TOK.tokenize(p) for p in PROMPTS]
    reference = engine.generate_tokens(prompts, ENDED, None, _Withdraws()).tokens
    assert [len(t) - len(p) for t, p in zip(reference, prompts)] == [6, 3, 6]
    results = run_distributed(_tp_worker, 2, _lead_withdrawn_rows)
    assert results[1] == 2
    assert results[0] == (reference, engine.generate_tokens(prompts, GREEDY).tokens)
