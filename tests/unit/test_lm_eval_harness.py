"""lm-evaluation-harness's `local-completions` backend against the server, with offline YAML
tasks over local JSONL files (loglikelihood with acc = is_greedy and perplexity,
loglikelihood_rolling, multiple_choice, generate_until), and its numbers against the harness's
own HuggingFace backend on the same weights, with the server's whole-batch scheduler and with
continuous batching (3 slots, prompts read 16 tokens a step, 4 concurrent harness requests).

The weights: a tiny random GPT-2 saved by transformers with a character-level tokenizer
(tokenizer.json); the server loads that folder with gigatron.from_pretrained (the HuggingFace ->
Gigatron conversion of gigatron.core.convert) and the same tokenizer file. Skipped where
lm-eval is not installed (pip install lm-eval==0.4.13, requirements-dev.txt).
"""

import json
import os
import string
import sys

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(__file__))
from _hf_fixtures import make_hf_model  # noqa: E402

from gigatron.core.inference.broadcast import LocalRunner  # noqa: E402
from gigatron.core.inference.engine import InferenceEngine  # noqa: E402
from gigatron.core.inference.server.app import build_app  # noqa: E402

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # one_thread: tests/conftest.py

MODEL = "tiny-gpt2"
CONTEXT = 64


def _hf_folder(path):
    """A tiny random GPT-2 with a character-level tokenizer (id 0 = <|endoftext|>); returns the
    HuggingFace model."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<|endoftext|>": 0}
    for c in string.printable:
        if c not in "\x0b\x0c\r":
            vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: one token per character
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    model = make_hf_model("gpt2", path, seed=3, vocab_size=len(vocab), n_positions=CONTEXT, bos_token_id=0,
                          eos_token_id=0)
    fast.save_pretrained(path)
    return model, fast


def _greedy_continuation(model, tokenizer, text, n):
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tokenizer.decode(ids[0, -n:])


def _write_tasks(folder, model, tokenizer):
    """Four tasks over JSONL files in `folder`; half of the loglikelihood targets are the model's
    greedy continuation (acc = is_greedy is then 0.5, not 0)."""
    contexts = ["the cat sat on the", "hello world, this is", "a quick brown fox", "to be or not to",
                "once upon a time", "lorem ipsum dolor"]
    ll = []
    for i, context in enumerate(contexts):
        target = _greedy_continuation(model, tokenizer, context, 3) if i % 2 == 0 else " xyz"
        ll.append({"context": context, "target": target})
    rolling = [{"text": "the rain in spain stays mainly in the plain."},
               {"text": "Colorless green ideas sleep furiously; 12 times."},
               {"text": "a"}]
    mc = [{"question": "2 + 2 =", "choices": [" 4", " 5", " fish"], "label": 0},
          {"question": "the sky is", "choices": [" blue", " green"], "label": 1}]
    gen = [{"question": "say hi:", "answer": _greedy_continuation(model, tokenizer, "say hi:", 6)},
           {"question": "count: 1 2 3", "answer": " 4 5"}]
    data = {"ll": ll, "rolling": rolling, "mc": mc, "gen": gen}
    for name, rows in data.items():
        with open(os.path.join(folder, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")

    def task(name, body):
        path = os.path.join(folder, f"{name}.jsonl")
        text = (f"task: gt_{name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {path}\n"
                f"test_split: test\n{body}")
        with open(os.path.join(folder, f"gt_{name}.yaml"), "w") as f:
            f.write(text)

    task("ll", 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
               "metric_list:\n  - metric: perplexity\n  - metric: acc\n")
    task("rolling", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                    "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n"
                    "  - metric: bits_per_byte\n")
    task("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
               'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    task("gen", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
                'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n  do_sample: false\n'
                "metric_list:\n  - metric: exact_match\n")
    return [f"gt_{name}" for name in data]


@pytest.fixture(scope="module")
def harness_setup(tmp_path_factory):
    """The HF folder, the tasks, and a server per scheduler: harness_setup[1](name) -> url."""
    import gigatron
    from gigatron.core.inference.server.background import serve_in_background
    from gigatron.core.tokenizers.huggingface import HuggingFaceTokenizer

    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    root = tmp_path_factory.mktemp("lm_eval")
    hf_dir = str(root / "hf")
    hf_model, fast = _hf_folder(hf_dir)
    tasks = _write_tasks(str(root), hf_model, fast)

    loaded = gigatron.from_pretrained(hf_dir)
    tokenizer = HuggingFaceTokenizer(hf_dir)
    vocab = hf_model.config.vocab_size
    servers = {}

    def url_of(scheduler):
        if scheduler not in servers:
            engine = InferenceEngine(loaded.model, tokenizer, vocab_size=vocab, max_batch_size=8,
                                     max_sequence_length=CONTEXT)
            app = build_app(LocalRunner(engine), tokenizer, max_batch_size=8, max_sequence_length=CONTEXT,
                            model_name=MODEL, dynamic_batching=scheduler == "continuous", max_requests=3,
                            prefill_chunk=16)
            servers[scheduler] = serve_in_background(app)
        return servers[scheduler].url

    hf_results = {}

    def hf_reference():
        if not hf_results:
            hf_results.update(_evaluate("hf", {"pretrained": hf_dir, "device": "cpu", "dtype": "float32",
                                               "max_length": CONTEXT - 1}, str(root), tasks))
        return hf_results

    yield url_of, hf_dir, str(root), tasks, hf_reference
    for srv in servers.values():
        srv.stop()


def _evaluate(model, model_args, root, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=TaskManager(include_path=root),
                          batch_size=1, log_samples=True, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                          torch_random_seed=0, fewshot_random_seed=0)
    return out


@pytest.mark.parametrize("scheduler,tokenizer", [("static", "huggingface"), ("continuous", "huggingface"),
                                                 ("static", "remote")])
def test_local_completions_match_the_hf_backend(harness_setup, scheduler, tokenizer, monkeypatch):
    """tokenizer "remote": the harness finds the server's /tokenizer_info and /tokenize by itself
    (tokenizer_backend auto) and needs no tokenizer files."""
    import lm_eval.utils

    url_of, hf_dir, root, tasks, hf_reference = harness_setup
    found = []
    check = lm_eval.utils.check_remote_tokenizer_support
    monkeypatch.setattr(lm_eval.utils, "check_remote_tokenizer_support",
                        lambda *a, **k: found.append(check(*a, **k)) or found[-1])
    model_args = {"base_url": url_of(scheduler) + "/v1/completions", "model": MODEL, "max_length": CONTEXT,
                  "num_concurrent": 4 if scheduler == "continuous" else 1, "max_retries": 1}
    if tokenizer == "huggingface":
        model_args.update(tokenizer=hf_dir, tokenizer_backend="huggingface")
    ours = _evaluate("local-completions", model_args, root, tasks)
    assert found == ([True] if tokenizer == "remote" else [])
    hf = hf_reference()
    for task in tasks:
        a, b = ours["results"][task], hf["results"][task]
        metrics = [k for k in b if k.endswith(",none") and not k.endswith("_stderr,none")]
        assert metrics, (task, b)
        for key in metrics:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (task, key, a[key], b[key])
    # Every loglikelihood request was answered (none crashed) and is_greedy found the greedy targets.
    assert ours["results"]["gt_ll"]["acc,none"] == pytest.approx(0.5)
    assert ours["results"]["gt_gen"]["exact_match,none"] >= 0.5
    # The per-request numbers agree too.
    for task in ("gt_ll", "gt_rolling", "gt_mc"):
        for sa, sb in zip(ours["samples"][task], hf["samples"][task]):
            for ra, rb in zip(sa["resps"], sb["resps"]):
                got, want = ra[0], rb[0]
                if isinstance(want, (list, tuple)):
                    assert got[0] == pytest.approx(want[0], abs=1e-4) and bool(got[1]) == bool(want[1]), (task, got, want)
                else:
                    assert got == pytest.approx(want, abs=1e-4), (task, got, want)
    gen_a = [s["resps"][0][0] for s in ours["samples"]["gt_gen"]]
    gen_b = [s["resps"][0][0] for s in hf["samples"]["gt_gen"]]
    assert gen_a == gen_b
