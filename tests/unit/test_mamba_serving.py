"""Serving a checkpoint of pretrain_mamba.py: the server tool started on a tiny hybrid checkpoint
answers Megatron's /api and OpenAI's /v1/completions with the greedy text of the engine on the same
weights (loaded with gigatron.from_pretrained, which builds a MambaModel for it); continuous
batching serves it too; tools/generate_text.py prints the same text."""

import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _inference_fixtures import assert_server_answers_greedily, running_server  # noqa: E402

from gigatron.core.inference.engine import InferenceEngine, SamplingParams  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MAMBA_FLAGS = ["--hybrid-override-pattern", "M*M-", "--mamba-state-dim", "8", "--mamba-head-dim", "8",
               "--mamba-num-groups", "2", "--position-embedding-type", "none", "--normalization", "RMSNorm",
               "--is-hybrid-model"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny hybrid model (M*M-) trained one iteration by pretrain_mamba and saved (`torch`
    format, NullTokenizer of 4096 ids)."""
    from gigatron.training import mamba
    from gigatron.training.arguments import parse_args
    from gigatron.training.loop import pretrain

    tmp_path = tmp_path_factory.mktemp("mamba_checkpoint")
    save = str(tmp_path / "ckpt")
    flags = ["--num-layers", "4", "--hidden-size", "16", "--num-attention-heads", "2", "--seq-length", "32",
             "--max-position-embeddings", "32", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
             "--mock-data", "--vocab-size", "4096", "--num-workers", "0", "--eval-iters", "0", "--train-iters", "1",
             "--save", save, "--data-cache-path", str(tmp_path / "cache"), "--log-interval", "1",
             "--ckpt-format", "torch", *MAMBA_FLAGS]
    args = parse_args(flags, extra_args_provider=mamba.extra_args_provider)
    pretrain(mamba.datasets_provider, mamba.model_provider, mamba.forward_step, args=args)
    return save



def _reference(checkpoint):
    import gigatron
    from gigatron.core.models.mamba import MambaModel
    from gigatron.core.tokenizers import NullTokenizer

    loaded = gigatron.from_pretrained(checkpoint)
    assert isinstance(loaded.model, MambaModel) and loaded.model.layer_types == ["M", "*", "M", "-"]
    return loaded, InferenceEngine(loaded.model, NullTokenizer(4096), max_batch_size=2)


def test_from_pretrained_loads_the_trained_weights(checkpoint):
    """Every tensor of the rank file, as pretrain_mamba saved it, is the loaded model's."""
    from gigatron.core.checkpoint.formats import read_model

    loaded, _ = _reference(checkpoint)
    saved = read_model(checkpoint).tensors
    state = loaded.model.state_dict()
    assert {k for k in state if not k.endswith("_extra_state")} <= set(saved)
    for name, value in state.items():
        if name in saved:
            # The vocabulary rows past the true vocabulary (4097 ids with the end-of-document) are padding.
            rows = 4097 if name in ("embedding.word_embeddings.weight", "output_layer.weight") else value.shape[0]
            torch.testing.assert_close(value[:rows], saved[name][:rows], rtol=0, atol=0)
    ids = loaded.generate([1, 2, 3], max_new_tokens=4)
    with torch.no_grad():
        grow = [1, 2, 3]
        for _ in range(4):
            grow.append(int(loaded(torch.tensor([grow]))[0, -1].argmax()))
    assert ids == grow


@pytest.mark.parametrize("dynamic", [False, True])
def test_server_tool_serves_a_hybrid_checkpoint(checkpoint, dynamic):
    _, engine = _reference(checkpoint)
    want = engine.generate(["1 2 3", "7"], SamplingParams(tokens_to_generate=4, top_k=1)).texts
    tool = "run_mamba_text_generation_server.py" if dynamic else "run_text_generation_server.py"
    args = ["--load", checkpoint, "--use-checkpoint-args", "--vocab-size", "4096", "--max-batch-size", "2"]
    if dynamic:
        args += ["--inference-dynamic-batching", "--inference-max-requests", "2", "--inference-prefill-chunk-size", "2"]
    with running_server(tool, args) as url:
        assert_server_answers_greedily(url, want)


def test_generate_text_tool_from_a_hybrid_checkpoint(checkpoint):
    _, engine = _reference(checkpoint)
    want = engine.generate(["1 2 3", "7"], SamplingParams(tokens_to_generate=4, top_k=1)).texts
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "generate_text.py"), "--load", checkpoint,
                          "--use-checkpoint-args", "--vocab-size", "4096", "--prompt", "1 2 3", "--prompt", "7",
                          "--tokens-to-generate", "4", "--greedy"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert [block for block in out.stdout.split("\n\n") if block.strip()] == want
