#!/usr/bin/env bash
# Every GPU-side check and measurement the README's open figures wait on, on one GPU, in one go:
# the GPU test suite, then the training, FP8, MoE, Mamba/hybrid and serving benches. Each step's
# full output goes to OUT/<step>.log and the benches' rows to OUT/<step>.json; one line per step
# here says how it ended. A failing step does not stop the others.
#
#     bash bench/gpu_checks.sh [OUT] [STEP ...]     # OUT defaults to gpu_checks/; steps default to all
#     bash bench/gpu_checks.sh out gpu_tests hybrid # only these steps
#
# Steps and their time on one H100/H200 (roughly; about 25 minutes in all):
#   gpu_tests     pytest -m gpu over tests/ (fused kernels, FP8 incl. grouped experts, Mamba
#                 kernels and decode, MLA generation in CUDA graphs, continuous step, ...)   ~5 min
#   train         bench_train.py: 1.3B GPT micro batch 4 eager and compiled, 350M, Llama-8B-shaped
#                 8 layers                                                                      ~6 min
#   fp8           bench_fp8.py: Llama-8B-shaped linears, bf16 against each recipe, eager and
#                 compiled                                                                      ~3 min
#   moe_fp8       bench_moe.py --fp8: grouped experts in each recipe against bf16              ~1 min
#   hybrid        bench_hybrid.py at 4096 and 16384 (the hybrid should now fit 16k without
#                 recompute)                                                                    ~2 min
#   mamba_decode  bench_mamba_decode.py: batch 1 after a 16k prompt, hybrid against GPT        ~2 min
#   serving       bench_serving.py --suite: offline decode against the bandwidth bound and the
#                 load run (needs fastapi and uvicorn installed)                                ~5 min
# The FP8 convergence run (bench/fp8_convergence.py, ~350M for 2,000 iterations) takes longer and
# is run on its own.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_checks}
shift || true
mkdir -p "$OUT"
PY=${PYTHON:-python3}
ALL=(gpu_tests train fp8 moe_fp8 hybrid mamba_decode serving)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ALL[@]}")

step_command() {
  case "$1" in
    gpu_tests)    echo "$PY -m pytest -q -p no:cacheprovider -m gpu tests/" ;;
    train)        echo "$PY bench/bench_train.py --configs gpt1p3b_mb4,gpt1p3b_mb4_compile,gpt350m_mb4,gpt350m_mb4_compile,llama8b_8l --json $OUT/train.json" ;;
    fp8)          echo "$PY bench/bench_fp8.py --json $OUT/fp8.json" ;;
    moe_fp8)      echo "$PY bench/bench_moe.py --fp8 tensorwise,delayed,blockwise" ;;
    hybrid)       echo "$PY bench/bench_hybrid.py --seqs 4096 16384 --json $OUT/hybrid.json" ;;
    mamba_decode) echo "$PY bench/bench_mamba_decode.py" ;;
    serving)      echo "$PY bench/bench_serving.py --suite --suite-models gpt1p3b --json $OUT/serving.json" ;;
    *)            return 1 ;;
  esac
}

for name in "${STEPS[@]}"; do
  step_command "$name" > /dev/null || { echo "unknown step '$name' (steps: ${ALL[*]})" >&2; exit 2; }
done

if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA device: these checks need one GPU" >&2
  exit 2
fi
$PY -c "import torch; print('card:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" | tee "$OUT/card.txt"

failed=0
for name in "${STEPS[@]}"; do
  cmd=$(step_command "$name")
  start=$(date +%s)
  echo "== $name: $cmd"
  $cmd > "$OUT/$name.log" 2>&1
  code=$?
  [ $code -ne 0 ] && failed=$((failed + 1))
  echo "   exit $code after $(( $(date +%s) - start )) s; last line: $(tail -n 1 "$OUT/$name.log")"
done
echo "$(( ${#STEPS[@]} - failed )) of ${#STEPS[@]} steps ended with exit 0; logs in $OUT/"
[ $failed -eq 0 ]
