#!/usr/bin/env bash
# Quickstart: set-up, then a small GPT trained on the CPU on real English text, all offline.
#   1. a JSON-lines corpus from Python's own standard-library documentation (pydoc)
#   2. a 4096-entry byte-level BPE tokenizer trained on it
#   3. tools/preprocess_data.py -> Megatron .bin/.idx dataset
#   4. pretrain_gpt.py: 4 layers, hidden 192, sequence 128, a few minutes on 2 cores, with
#      validation, a checkpoint and a loss-curve PNG
#   5. a short text sample generated from the checkpoint
# Everything lands in ./quickstart_out (override with OUT=...). ITERS=... changes the run length.
set -euo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-quickstart_out}
ITERS=${ITERS:-200}
bash scripts/install.sh
mkdir -p "$OUT/data"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

echo "== 1/5 corpus from Python's documentation"
[ -s "$OUT/corpus.jsonl" ] || python3 tools/make_corpus.py --output "$OUT/corpus.jsonl" --target-mb 6

echo "== 2/5 tokenizer"
[ -s "$OUT/tokenizer/tokenizer.json" ] || python3 tools/train_tokenizer.py --input "$OUT/corpus.jsonl" \
    --vocab-size 4096 --output-dir "$OUT/tokenizer"

echo "== 3/5 preprocess"
python3 tools/preprocess_data.py --input "$OUT/corpus.jsonl" --output-prefix "$OUT/data/pydoc" \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer/tokenizer.json" \
    --append-eod --workers 2 --log-interval 200

echo "== 4/5 train"
rm -rf "$OUT/checkpoints"
python3 pretrain_gpt.py \
    --num-layers 4 --hidden-size 192 --num-attention-heads 4 --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 16 --global-batch-size 16 --train-iters "$ITERS" \
    --lr 3e-3 --min-lr 3e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 --clip-grad 1.0 \
    --attention-dropout 0 --hidden-dropout 0 \
    --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$OUT/tokenizer/tokenizer.json" \
    --data-path "$OUT/data/pydoc_text_document" --split 95,5,0 --num-workers 0 \
    --log-interval 20 --eval-interval 50 --eval-iters 10 \
    --save "$OUT/checkpoints" --save-interval "$ITERS" --tensorboard-dir "$OUT/tensorboard"

echo "== 5/5 sample from the checkpoint"
python3 tools/generate_text.py --load "$OUT/checkpoints" --use-checkpoint-args \
    --prompt "The os module provides" --tokens-to-generate 40 --top-k 5 --temperature 0.8 --seed 1

echo
echo "Loss curve: $(ls "$OUT"/checkpoints/*.png 2>/dev/null | head -1)"
