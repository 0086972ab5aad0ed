"""Train a small GPT-2-style byte-level BPE tokenizer offline from a JSON-lines corpus.

    python tools/train_tokenizer.py --input corpus.jsonl --vocab-size 8192 --output-dir my-tokenizer
    # -> my-tokenizer/tokenizer.json              (--tokenizer-type HuggingFaceTokenizer --tokenizer-model my-tokenizer)
    #    my-tokenizer/vocab.json, merges.txt      (--tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ...)

The tokenizer pre-tokenizes like GPT-2 (same pattern, no prefix space), starts from all 256 byte
values and is trained with HuggingFace ``tokenizers``. Ids are laid out like OpenAI's GPT-2 files:
the 256 byte tokens first, then one token per merge in merge order, then ``<|endoftext|>`` last, so
GPT2BPETokenizer can encode it with tiktoken.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

EOD = "<|endoftext|>"


def iter_texts(path: str, keys: list, limit_bytes: int | None):
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    seen = 0
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: malformed JSON ({e})") from None
            for k in keys:
                if k not in obj:
                    raise ValueError(f"{path}:{n}: key {k!r} not found; keys present: {list(obj)}")
                yield obj[k]
            seen += len(line)
            if limit_bytes is not None and seen >= limit_bytes:
                return


def train(input_path: str, vocab_size: int, output_dir: str, json_keys=("text",), min_frequency: int = 2,
          limit_mb: float | None = None) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"--vocab-size must exceed 256 (the byte tokens plus {EOD}), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=min_frequency, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    limit = int(limit_mb * 1024 * 1024) if limit_mb else None
    tok.train_from_iterator(iter_texts(input_path, list(json_keys), limit), trainer=trainer)
    tok.add_special_tokens([EOD])  # id = number of byte and merge tokens: last, as in GPT-2

    os.makedirs(output_dir, exist_ok=True)
    model = json.loads(tok.to_str())["model"]
    vocab = dict(model["vocab"])
    vocab[EOD] = tok.token_to_id(EOD)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    _write(os.path.join(output_dir, "tokenizer.json"), tok.to_str(pretty=True))
    _write(os.path.join(output_dir, "vocab.json"), json.dumps(vocab, ensure_ascii=False))
    _write(os.path.join(output_dir, "merges.txt"), "#version: 0.2\n" + "\n".join(merges) + "\n")
    _write(os.path.join(output_dir, "tokenizer_config.json"), json.dumps({"eos_token": EOD, "bos_token": EOD}))


def _write(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help="JSON-lines corpus (.gz allowed)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="keys holding the text")
    parser.add_argument("--vocab-size", type=int, default=8192, help="ids in all, <|endoftext|> included")
    parser.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to be merged")
    parser.add_argument("--limit-mb", type=float, default=None, help="train on at most this many MB of input")
    parser.add_argument("--output-dir", required=True, help="folder for tokenizer.json, vocab.json, merges.txt")
    args = parser.parse_args(argv)
    try:
        train(args.input, args.vocab_size, args.output_dir, args.json_keys, args.min_frequency, args.limit_mb)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}/tokenizer.json, vocab.json, merges.txt", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
