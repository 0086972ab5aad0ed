"""bench/bench_train.py: the log parser, the kernel grouping and a tiny CPU run through pretrain_gpt.py."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import bench_train  # noqa: E402


LINE = (" [2026-12-07 02:42:49] iteration        {i}/      12 | consumed samples:  4 | elapsed time per iteration "
        "(ms): {ms} | learning rate: 8.3E-05 | global batch size:     4 | lm loss: 6.944396E+00 | loss scale: 1.0 | "
        "peak allocated memory (GiB): {mem} | peak reserved memory (GiB): 30.00 |")


def test_parse_log_and_steady_median():
    text = "\n".join(LINE.format(i=i, ms=ms, mem=mem) for i, ms, mem in
                     [(1, 900.0, 10.5), (2, 120.0, 12.25), (3, 101.0, 12.0), (4, 100.0, 12.0), (5, 99.0, 12.0)])
    parsed = bench_train.parse_log(text + "\nnoise line\n")
    assert parsed["times"] == {1: 900.0, 2: 120.0, 3: 101.0, 4: 100.0, 5: 99.0}
    assert parsed["peak_gib"] == 12.25
    assert parsed["loss"] == pytest.approx(6.944396)
    assert bench_train.steady_median(parsed["times"], warmup=2) == 100.0


def test_flops_match_the_issue_mfu():
    # Issue 21: Gigatron eager, micro batch 4, 580.3 ms/iter = 48.3% of 989.4 TFLOP/s.
    config = bench_train.all_configs()["gpt1p3b_mb4"]
    tflops = bench_train.iteration_flops(config) / 0.5803 / 1e12
    assert 100 * tflops / 989.4 == pytest.approx(48.3, abs=0.05)


def test_kernel_categories():
    cat = bench_train.kernel_category
    assert cat("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "GEMM"
    assert cat("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "GEMM"
    assert cat("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128>>") == "attention"
    assert cat("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16>") == \
        "norm+elementwise"
    assert cat("_layer_norm_residual_fwd") == "norm+elementwise"
    assert cat("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>") == \
        "optimizer"
    assert cat("ncclDevKernel_AllReduce_Sum_f32_RING_LL") == "other"


def test_table_names_the_card():
    rows = [{"config": "a", "status": 0, "ms_per_iter": 500.0, "tokens_per_s": 65536.0, "tflops": 494.7,
             "peak_gib": 20.0, "loss": 8.0812}, {"config": "b", "status": 1}]
    table = bench_train.format_table(rows, "NVIDIA H100 80GB HBM3", 989.4)
    assert "50.0%" in table and "NVIDIA H100 80GB HBM3" in table and "failed (1)" in table and "8.0812" in table


def test_tiny_run_through_pretrain_gpt(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_train.py"), "--tiny", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tiny_cpu" in done.stdout and "ms/iter" in done.stdout
    rows = json.loads(out.read_text())["rows"]
    assert rows[0]["iterations"] == 6 and rows[0]["ms_per_iter"] > 0 and rows[0]["tokens_per_s"] > 0
