#!/bin/bash
# DeepSeek-V3-style model (61 layers, hidden 7168, 128 heads of multi-latent attention with query
# rank 1536 and key/value rank 512, YaRN rotary scaling by 40; the first 3 layers dense, the other
# 58 MoE with 256 routed experts of 2048 (top-8 of 8 groups, 4 groups per token, sigmoid scores
# with the aux-loss-free expert bias) plus one shared expert; one multi-token prediction block)
# with Megatron's flag set, on tensor 2 x pipeline 8 x expert 64 parallelism. Usage:
#   bash examples/recipes/deepseek_v3.sh CHECKPOINT_DIR TENSORBOARD_DIR TOKENIZER_MODEL DATA_PREFIX
# Megatron's recipe uses the flex token dispatcher (DeepEP), which Gigatron does not have: this
# script dispatches tokens with alltoall. It trains in FP8 with DeepSeek-V3's blockwise scaling
# (1x128 activation tiles, 128x128 weight blocks); the grouped-GEMM experts stay in bf16.
set -euo pipefail
cd "$(dirname "$0")/../.."

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NUM_NODES=${NUM_NODES:-128}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NODE_RANK=${NODE_RANK:-0}

CHECKPOINT_PATH=$1
TENSORBOARD_LOGS_PATH=$2
TOKENIZER_MODEL=$3
DATA_PATH=$4

DISTRIBUTED_ARGS=(
    --nproc_per_node $GPUS_PER_NODE
    --nnodes $NUM_NODES
    --node_rank $NODE_RANK
    --master_addr $MASTER_ADDR
    --master_port $MASTER_PORT
)

MODEL_ARGS=(
    --use-mcore-models
    --num-layers 61
    --hidden-size 7168
    --ffn-hidden-size 18432
    --num-attention-heads 128
    --kv-channels 128
    --seq-length 4096
    --max-position-embeddings 163840
    --normalization RMSNorm
    --norm-epsilon 1e-6
    --swiglu
    --untie-embeddings-and-output-weights
    --disable-bias-linear
    --attention-dropout 0.0
    --hidden-dropout 0.0
    --init-method-std 0.02
    --position-embedding-type rope
    --no-position-embedding
    --no-rope-fusion
    --rotary-base 10000
    --transformer-impl transformer_engine
)

MLA_ARGS=(
    --multi-latent-attention
    --q-lora-rank 1536
    --kv-lora-rank 512
    --qk-head-dim 128
    --qk-pos-emb-head-dim 64
    --v-head-dim 128
    --qk-layernorm
    --rotary-scaling-factor 40
    --mscale 1.0
    --mscale-all-dim 1.0
)

MOE_ARGS=(
    --num-experts 256
    --moe-layer-freq "([0]*3+[1]*58)"
    --moe-ffn-hidden-size 2048
    --moe-shared-expert-intermediate-size 2048
    --moe-router-topk 8
    --moe-router-num-groups 8
    --moe-router-group-topk 4
    --moe-router-topk-scaling-factor 2.5
    --moe-router-score-function sigmoid
    --moe-router-pre-softmax
    --moe-router-enable-expert-bias
    --moe-router-bias-update-rate 1e-3
    --moe-router-load-balancing-type seq_aux_loss
    --moe-aux-loss-coeff 1e-4
    --moe-router-dtype fp32
    --moe-grouped-gemm
    --moe-token-dispatcher-type alltoall
    --moe-permute-fusion
    --moe-shared-expert-overlap
)

MTP_ARGS=(
    --mtp-num-layers 1
    --mtp-loss-scaling-factor 0.1
)

DATA_ARGS=(
    --tokenizer-type HuggingFaceTokenizer
    --tokenizer-model $TOKENIZER_MODEL
    --data-path $DATA_PATH
    --split 99,1,0
    --no-create-attention-mask-in-dataloader
)

TRAINING_ARGS=(
    --micro-batch-size 1
    --global-batch-size 8192
    --train-iters 500000
    --lr-decay-iters 480000
    --lr-warmup-iters 2000
    --lr 2.2e-4
    --min-lr 2.2e-5
    --lr-decay-style cosine
    --weight-decay 0.1
    --adam-beta1 0.9
    --adam-beta2 0.95
    --clip-grad 1.0
    --bf16
    --fp8-format e4m3
    --fp8-recipe blockwise
    --cross-entropy-loss-fusion
    --recompute-granularity selective
    --recompute-modules mla_up_proj layernorm
)

MODEL_PARALLEL_ARGS=(
    --tensor-model-parallel-size 2
    --pipeline-model-parallel-size 8
    --decoder-first-pipeline-num-layers 5
    --expert-model-parallel-size 64
    --sequence-parallel
    --use-distributed-optimizer
    --overlap-grad-reduce
    --overlap-param-gather
)

LOGGING_ARGS=(
    --log-interval 1
    --save-interval 1000
    --eval-interval 1000
    --eval-iters 10
    --ckpt-format torch_dist
    --auto-detect-ckpt-format
    --save $CHECKPOINT_PATH
    --load $CHECKPOINT_PATH
    --tensorboard-dir $TENSORBOARD_LOGS_PATH
)

torchrun "${DISTRIBUTED_ARGS[@]}" pretrain_gpt.py \
    "${MODEL_ARGS[@]}" \
    "${MLA_ARGS[@]}" \
    "${MOE_ARGS[@]}" \
    "${MTP_ARGS[@]}" \
    "${DATA_ARGS[@]}" \
    "${TRAINING_ARGS[@]}" \
    "${MODEL_PARALLEL_ARGS[@]}" \
    "${LOGGING_ARGS[@]}"
