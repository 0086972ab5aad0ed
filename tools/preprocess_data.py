"""Tokenize JSON-lines text into Megatron indexed datasets (.bin/.idx), with Megatron's flags.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/my-gpt2 \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \
        --append-eod --workers 2
    # -> data/my-gpt2_text_document.bin / .idx   (train with --data-path data/my-gpt2_text_document)
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from gigatron.cli import run_cli  # noqa: E402
from gigatron.core.data.preprocess import PreprocessConfig, preprocess  # noqa: E402
from gigatron.core.tokenizers import TOKENIZER_TYPES  # noqa: E402


def add_tokenizer_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group(title="tokenizer")
    group.add_argument("--tokenizer-type", type=str, required=True, choices=TOKENIZER_TYPES,
                       help="What type of tokenizer to use.")
    group.add_argument("--vocab-file", type=str, default=None,
                       help="vocab.json (GPT2BPETokenizer) or vocab.txt (BertWordPiece*).")
    group.add_argument("--merge-file", type=str, default=None, help="merges.txt (GPT2BPETokenizer).")
    group.add_argument("--tokenizer-model", type=str, default=None,
                       help="SentencePiece .model, HuggingFace tokenizer.json or folder, or tiktoken ranks file.")
    group.add_argument("--vocab-size", type=int, default=None,
                       help="NullTokenizer / TikTokenizer vocabulary size.")
    group.add_argument("--vocab-extra-ids", type=int, default=0,
                       help="Number of T5 sentinel tokens <extra_id_i> to add (BERT, SentencePiece).")
    group.add_argument("--tiktoken-pattern", type=str, default=None, choices=["v1", "v2"],
                       help="TikTokenizer pre-tokenization pattern.")
    group.add_argument("--tiktoken-num-special-tokens", type=int, default=1000,
                       help="TikTokenizer: number of ids reserved for special tokens.")
    group.add_argument("--tiktoken-special-tokens", type=str, nargs="+", default=None,
                       help="TikTokenizer special tokens (must include <unk>, <s>, </s>).")
    return parser


def get_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_tokenizer_args(parser)
    group = parser.add_argument_group(title="input data")
    group.add_argument("--input", type=str, required=True,
                       help="JSON-lines file (one JSON object per line); .gz files are read compressed.")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="Keys to extract from each JSON object; one output pair per key.")
    group.add_argument("--split-sentences", action="store_true",
                       help="Split documents into sentences (outputs named _sentence).")
    group.add_argument("--keep-newlines", action="store_true",
                       help="Keep newlines between sentences when splitting.")
    group.add_argument("--lang", type=str, default="english",
                       help="Language for sentence splitting (english built in; others via pysbd).")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="Count and skip malformed lines (bad JSON, missing key, non-text value) "
                            "instead of stopping at the first one.")
    group = parser.add_argument_group(title="tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="Append an <eod> token to the end of each document.")
    group = parser.add_argument_group(title="output data")
    group.add_argument("--output-prefix", type=str, required=True,
                       help="Path to binary output files without suffix.")
    group = parser.add_argument_group(title="runtime")
    group.add_argument("--workers", type=int, required=True,
                       help="Number of worker processes (over all partitions).")
    group.add_argument("--partitions", type=int, default=1,
                       help="Number of input parts processed side by side, then merged in order.")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="Accepted for compatibility: documents always keep their input order, "
                            "with or without partitions.")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="Print progress every this many documents.")
    group.add_argument("--threads-per-worker", type=int, default=None,
                       help="Tokenizer library threads per worker (default: cores / workers).")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Parse the flags and run; bad input raises (run through `run_cli`, it is one `error:` line)."""
    args = get_args(argv)
    fields = set(PreprocessConfig.__dataclass_fields__)
    config = PreprocessConfig(**{k: v for k, v in vars(args).items() if k in fields})
    if args.tokenizer_type.lower().startswith("bert") and not args.split_sentences:
        print("note: BERT models are usually trained on sentence-level data (--split-sentences)", file=sys.stderr)
    preprocess(config)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
