"""bench/bench_hybrid.py --tiny: the hybrid-vs-GPT training-throughput bench runs end to end on the
CPU at toy sizes (the GPU run is the same code at the 1.3B sizes)."""

import importlib.util
import json
import os

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _bench():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_hybrid.py")
    spec = importlib.util.spec_from_file_location("bench_hybrid", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_hybrid_pattern_is_our_allocation_of_megatrons_ratios():
    bench = _bench()
    pattern = bench.hybrid_pattern(40)
    assert (pattern.count("M"), pattern.count("*"), pattern.count("-")) == (17, 3, 20)
    assert pattern.startswith("M-M-M--M-*") and pattern.endswith("M-")
    assert bench.hybrid_pattern(48).count("*") == 4  # round(48 * 0.08)


def test_tiny_run_times_both_models_at_each_length(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "rows.json"
    assert bench.main(["--tiny", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["model"], r["seq"]) for r in rows] == [("gpt", 64), ("hybrid", 64), ("gpt", 128), ("hybrid", 128)]
    assert "*" in result["hybrid_pattern"] and "M" in result["hybrid_pattern"]
    for row in rows:
        assert row["tokens_s"] > 0 and row["tflops"] > 0 and row["params"] > 0
        assert row["mbs"] * row["micro"] * row["seq"] == 256  # the same tokens per iteration
    for gpt, hybrid in zip(rows[::2], rows[1::2]):
        assert hybrid["ratio_vs_gpt"] == pytest.approx(hybrid["tokens_s"] / gpt["tokens_s"])
    assert "hybrid/GPT" in capsys.readouterr().out
