"""The serving benchmarks run end to end on CPU at tiny sizes (bench/bench_serving.py --suite
--cpu-smoke, bench/bench_decode.py --cpu-smoke with the continuous mode): the GPU run is the same
code at full size."""

import json
import os

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "bench")


@pytest.fixture(autouse=True)
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(BENCH)


def test_serving_suite_cpu_smoke(tmp_path, capsys):
    import bench_serving

    out = tmp_path / "suite.json"
    assert bench_serving.main(["--suite", "--cpu-smoke", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["card"] == "CPU"
    smoke = result["models"]["smoke"]
    assert [(r["batch"], r["kernels"]) for r in smoke["decode"]] == [(1, "default"), (3, "default"), (3, "skinny"),
                                                                     (3, "default"), (3, "skinny")]
    for row in smoke["decode"]:
        assert row["tokens_per_s"] > 0 and 0 < row["bound_tokens_per_s"] < row["weights_only_limit_tokens_per_s"]
    load = smoke["load"]
    assert load["scheduler"] == "continuous" and load["requests"] == 8 and load["output_tokens_per_s"] > 0
    assert load["itl_p99_ms"] >= load["itl_p50_ms"] and load["itl_p99_over_batch1_step"] > 0
    assert 1 <= load["mean_batch"] <= 3 and load["mean_kv_positions"] > 4
    printed = capsys.readouterr().out
    assert "fraction_of_bound" in printed and "itl_p99_over_batch1_step" in printed


def test_decode_bench_continuous_mode_cpu_smoke(tmp_path):
    import bench_decode

    out = tmp_path / "decode.json"
    assert bench_decode.main(["--cpu-smoke", "--no-hf", "--modes", "eager", "continuous", "--batch-sizes", "2",
                              "--repeats", "1", "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["gigatron_continuous_tokens_per_s"] > 0 and "gigatron_continuous_fraction_of_bound" in row
    assert row["bound_tokens_per_s"] < row["bandwidth_limit_tokens_per_s"]  # the KV cache counts too
    assert "continuous_differs_from_eager" not in row  # the same greedy tokens (fp32)


def test_bound_formula():
    import bench_decode

    # One step, one row, prompt 1: W + 2 positions of kv bytes.
    assert bench_decode.weights_kv_bound(1000, 10, 1, 1, 1, 1e6) == pytest.approx(1e6 / 1020)
    # Two steps of 4 rows after 3-token prompts: bytes (100 + 4*4*5) + (100 + 4*5*5) = 380.
    assert bench_decode.weights_kv_bound(100, 5, 4, 3, 2, 1.0) == pytest.approx(8 / 380)
