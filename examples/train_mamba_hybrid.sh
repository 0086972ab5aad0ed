#!/bin/bash
# Pretrain a hybrid Mamba-2 model (Mamba-2, attention and MLP layers) with the recipe of Megatron-LM's
# Mamba example (the 8B Mamba-2-Hybrid: 8% attention layers, half of the layers MLP, the rest Mamba-2;
# GQA with 8 groups, no position embeddings, RMSNorm, untied output layer, bf16), through
# pretrain_mamba.py. The flags are Megatron's, unchanged; only the sizes below vary.
#
# Use: examples/train_mamba_hybrid.sh <data-path prefix> <SentencePiece tokenizer model>
#
# MODEL_SCALE=800M (default) or 8B picks the sizes. Every size can be overridden from the
# environment (NUM_LAYERS, HIDDEN_SIZE, NUM_ATTENTION_HEADS, TENSOR_MODEL_PARALLEL_SIZE,
# GLOBAL_BATCH_SIZE, MICRO_BATCH_SIZE, SEQ_LEN, TRAIN_SAMPLES, LR_WARMUP_SAMPLES, LR_DECAY_SAMPLES,
# LOG_INTERVAL, SAVE_INTERVAL, EVAL_INTERVAL, EVAL_ITERS) to shrink the run, e.g. for a CPU smoke test;
# NPROC is the number of processes torchrun starts (8), CHECKPOINT_DIR, DATACACHE_DIR and
# TENSORBOARD_DIR where the run writes (./checkpoints, ./data-cache, ./tensorboard).
# The Mamba layers take Megatron's defaults: --mamba-state-dim 128, --mamba-head-dim 64,
# --mamba-num-groups 8 (so 2 * hidden / 64 heads must divide into 8 groups: hidden >= 256).
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 <data-path prefix> <tokenizer model>" >&2
    exit 2
fi
DATA_PATH=$1
TOKENIZER_PATH=$2

MODEL_SCALE=${MODEL_SCALE:-800M}
case "${MODEL_SCALE}" in
    800M) D_TP=1; D_LAYERS=48; D_HIDDEN=1024; D_HEADS=16; D_GBS=32 ;;
    8B)   D_TP=4; D_LAYERS=56; D_HIDDEN=4096; D_HEADS=32; D_GBS=8 ;;
    *) echo "MODEL_SCALE must be 800M or 8B, got ${MODEL_SCALE}" >&2; exit 2 ;;
esac
TENSOR_MODEL_PARALLEL_SIZE=${TENSOR_MODEL_PARALLEL_SIZE:-$D_TP}
NUM_LAYERS=${NUM_LAYERS:-$D_LAYERS}
HIDDEN_SIZE=${HIDDEN_SIZE:-$D_HIDDEN}
NUM_ATTENTION_HEADS=${NUM_ATTENTION_HEADS:-$D_HEADS}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-$D_GBS}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-4}
SEQ_LEN=${SEQ_LEN:-4096}
TRAIN_SAMPLES=${TRAIN_SAMPLES:-73242188}        # 300B tokens at 4096 per sample
LR_WARMUP_SAMPLES=${LR_WARMUP_SAMPLES:-50000}
LR_DECAY_SAMPLES=${LR_DECAY_SAMPLES:-73192188}  # train samples - warmup samples
LOG_INTERVAL=${LOG_INTERVAL:-10}
SAVE_INTERVAL=${SAVE_INTERVAL:-2000}
EVAL_INTERVAL=${EVAL_INTERVAL:-2000}
EVAL_ITERS=${EVAL_ITERS:-32}
NPROC=${NPROC:-8}

CHECKPOINT_DIR=${CHECKPOINT_DIR:-./checkpoints}
DATACACHE_DIR=${DATACACHE_DIR:-./data-cache}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-./tensorboard}
mkdir -p "${CHECKPOINT_DIR}" "${DATACACHE_DIR}" "${TENSORBOARD_DIR}"

export CUDA_DEVICE_MAX_CONNECTIONS=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

options=(
    --tensor-model-parallel-size "${TENSOR_MODEL_PARALLEL_SIZE}"
    --sequence-parallel
    --pipeline-model-parallel-size 1
    --use-distributed-optimizer
    --overlap-param-gather
    --overlap-grad-reduce
    --untie-embeddings-and-output-weights
    --init-method-std 0.02
    --position-embedding-type none
    --num-layers "${NUM_LAYERS}"
    --hidden-size "${HIDDEN_SIZE}"
    --num-attention-heads "${NUM_ATTENTION_HEADS}"
    --group-query-attention
    --num-query-groups 8
    --hybrid-attention-ratio 0.08
    --hybrid-mlp-ratio 0.5
    --seq-length "${SEQ_LEN}"
    --max-position-embeddings "${SEQ_LEN}"
    --train-samples "${TRAIN_SAMPLES}"
    --lr-warmup-samples "${LR_WARMUP_SAMPLES}"
    --lr-decay-samples "${LR_DECAY_SAMPLES}"
    --save "${CHECKPOINT_DIR}"
    --load "${CHECKPOINT_DIR}"
    --data-path "${DATA_PATH}"
    --data-cache-path "${DATACACHE_DIR}"
    --split 99,1,0
    --tokenizer-type GPTSentencePieceTokenizer
    --tokenizer-model "${TOKENIZER_PATH}"
    --distributed-backend nccl
    --micro-batch-size "${MICRO_BATCH_SIZE}"
    --global-batch-size "${GLOBAL_BATCH_SIZE}"
    --lr 2.5e-4
    --min-lr 2.5e-5
    --lr-decay-style cosine
    --weight-decay 0.1
    --clip-grad 1.0
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --disable-bias-linear
    --normalization RMSNorm
    --adam-beta1 0.9
    --adam-beta2 0.95
    --log-interval "${LOG_INTERVAL}"
    --save-interval "${SAVE_INTERVAL}"
    --eval-interval "${EVAL_INTERVAL}"
    --eval-iters "${EVAL_ITERS}"
    --bf16
    --use-mcore-models
    --spec megatron.core.models.mamba.mamba_layer_specs mamba_stack_spec
    --no-create-attention-mask-in-dataloader
    --tensorboard-dir "${TENSORBOARD_DIR}"
)

exec torchrun --nproc_per_node "${NPROC}" "${HERE}/../pretrain_mamba.py" "${options[@]}"
