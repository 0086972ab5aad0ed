"""Tiny GPT models, a character tokenizer and the checks shared by the generation tests."""

import contextlib
import os
import socket
import string
import subprocess
import sys
import time

import torch

from gigatron.core.models.gpt import GPTModel
from gigatron.core.parallel.groups import ParallelGroups
from gigatron.core.transformer.config import TransformerConfig


class CharTokenizer:
    """Test tokenizer: id 0 is the end-of-document token, then one id per character of
    `alphabet`, including "\\n" and ":"."""

    def __init__(self, alphabet: str = string.ascii_lowercase + " \n:.,"):
        self.alphabet = alphabet
        self.index = {c: i + 1 for i, c in enumerate(alphabet)}

    @property
    def vocab_size(self):
        return len(self.alphabet) + 1

    @property
    def eod(self):
        return 0

    @property
    def pad(self):
        return 0

    def tokenize(self, text):
        return [self.index[c] for c in text]

    def detokenize(self, ids):
        return "".join("<eod>" if i == 0 else self.alphabet[i - 1] for i in ids)


def tiny_config(**kw):
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=64,
                max_position_embeddings=64, attention_dropout=0.0, hidden_dropout=0.0,
                use_cpu_initialization=True)
    base.update(kw)
    return TransformerConfig(**base)


PADDED_VOCAB = 40  # the char tokenizer has 32 tokens; 8 padded entries


def tiny_model(seed=7, groups=None, **kw):
    config = tiny_config(**kw)
    groups = groups or ParallelGroups.single()
    model = GPTModel(config, groups, PADDED_VOCAB, seed=seed)
    return model.eval()


V = CharTokenizer().vocab_size  # the true vocabulary (logits are cut to it)


@torch.no_grad()
def full_logits(model, ids):
    """The full-sequence forward (no cache) of one row: logits [len, V] (fp32, true vocabulary)."""
    device = next(model.parameters()).device
    return model(torch.tensor([ids], device=device))[:, 0, :V].float()


@torch.no_grad()
def reference_greedy(model, ids, n):
    """Greedy continuation recomputing the full forward for every new token: (ids, logits [n, V])."""
    ids, steps = list(ids), []
    for _ in range(n):
        last = full_logits(model, ids)[-1]
        steps.append(last)
        ids.append(int(last.argmax()))
    return ids, torch.stack(steps)


@torch.no_grad()
def cached_greedy(engine, prompts, n):
    """Greedy decoding through the engine's cache step by step (prefill of the right-padded batch,
    each row's real length passed for recurrent layers, then one token per row at its own
    position): (ids per row, logits of each step [b, n, V])."""
    ctx = engine.context()
    b = len(prompts)
    lengths = torch.tensor([len(p) for p in prompts])
    longest = int(lengths.max())
    tokens = torch.zeros(b, longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p)
    positions = torch.arange(longest).expand(b, longest)
    logits = engine._forward(ctx, tokens, positions, longest, lengths=lengths)  # [b, L, V]
    step = logits[torch.arange(b), lengths - 1]  # [b, V]
    out, seen = [list(p) for p in prompts], []
    for t in range(n):
        seen.append(step)
        new = step.argmax(-1)
        for i in range(b):
            out[i].append(int(new[i]))
        step = engine._forward(ctx, new[:, None], (lengths + t)[:, None], longest + t + 1)[:, -1]
    return out, torch.stack(seen, dim=1)


def assert_decode_steps_never_synchronize(engine, prompts, params, monkeypatch):
    """Generate once (warm-up: kernels, probes, graphs), then again with
    torch.cuda.set_sync_debug_mode('error') around the decode steps, which raises on any
    synchronizing CUDA call (item, nonzero, a blocking copy to the host); both runs agree."""
    from gigatron.core.inference.engine import InferenceEngine

    expected = engine.generate_tokens(prompts, params)
    steps = InferenceEngine._decode_steps

    def strict(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return steps(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(InferenceEngine, "_decode_steps", strict)
    out = engine.generate_tokens(prompts, params)
    assert (out.tokens, out.logprobs) == (expected.tokens, expected.logprobs)


def assert_engine_generation_equals_full_forward(model, engine, prompts, n):
    """generate_tokens (the engine's own loop) gives the full forward's greedy tokens and
    log-probabilities for each of `prompts` (token ids), batched and one prompt at a time."""
    import torch.nn.functional as F

    from gigatron.core.inference.engine import SamplingParams

    params = SamplingParams(tokens_to_generate=n, top_k=1, stop_at_eod=False, return_log_probs=True)
    batched = engine.generate_tokens(prompts, params)
    for i, p in enumerate(prompts):
        ids, _ = reference_greedy(model, p, n)
        assert batched.tokens[i] == ids
        want = F.log_softmax(full_logits(model, ids[:-1]), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(batched.logprobs[i]), want, rtol=1e-5, atol=1e-5)
        assert engine.generate_tokens([p], params).tokens[0] == ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(tool: str, args, env=None, seconds: float = 240):
    """Start tools/<tool> (a text-generation server) with `args` and a free --port, wait until its
    /health answers, yield its base URL; the server is terminated afterwards."""
    import httpx

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    port = free_port()
    cmd = [sys.executable, os.path.join(root, "tools", tool), *args, "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + seconds
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def assert_server_answers_greedily(url, want):
    """The server at `url` answers PUT /api for the prompts "1 2 3" and "7" (4 greedy tokens each,
    ids of a NullTokenizer) with the texts `want`, and POST /v1/completions for "1 2 3" with the
    same 4 generated ids."""
    import httpx

    api = httpx.put(url + "/api", json={"prompts": ["1 2 3", "7"], "tokens_to_generate": 4, "top_k": 1}, timeout=60)
    assert api.status_code == 200, api.text
    assert api.json()["text"] == want
    completion = httpx.post(url + "/v1/completions", json={"prompt": "1 2 3", "max_tokens": 4, "temperature": 0},
                            timeout=60)
    assert completion.status_code == 200, completion.text
    assert completion.json()["choices"][0]["text"].split() == want[0].split()[3:]  # the 4 generated ids
