"""Concatenate indexed datasets (.bin/.idx pairs) into one, in order.

    python tools/merge_datasets.py --input data/shards --output-prefix data/all_text_document
    python tools/merge_datasets.py --input a_text_document b_text_document --output-prefix ab_text_document

With a folder, every pair in it is merged in file-name order. All inputs must store the same
token dtype. The output is written under a temporary name and moved into place when complete.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), os.path.pardir)))

from gigatron.cli import run_cli  # noqa: E402
from gigatron.core.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from gigatron.core.data.preprocess import commit_pair  # noqa: E402


def find_prefixes(inputs: list, output_prefix: str) -> list:
    """Dataset prefixes named by ``inputs`` (folders are expanded to the pairs they hold, sorted)."""
    prefixes = []
    out = os.path.abspath(output_prefix)
    for item in inputs:
        if os.path.isdir(item):
            found = []
            for name in sorted(os.listdir(item)):
                if name.endswith(".idx") and not name.startswith("."):
                    prefix = os.path.join(item, name[:-4])
                    if os.path.isfile(prefix + ".bin") and os.path.abspath(prefix) != out:
                        found.append(prefix)
            if not found:
                raise ValueError(f"--input folder {item} holds no .bin/.idx pairs")
            prefixes.extend(found)
        else:
            prefix = item[:-4] if item.endswith((".bin", ".idx")) else item
            if not IndexedDataset.exists(prefix):
                raise ValueError(f"--input {item}: no {prefix}.bin / {prefix}.idx pair")
            prefixes.append(prefix)
    return prefixes


def merge(prefixes: list, output_prefix: str) -> None:
    if not prefixes:
        raise ValueError("nothing to merge")
    dtypes = {}
    for p in prefixes:
        ds = IndexedDataset(p)
        dtypes[p] = ds.dtype
        ds.close()
    first = prefixes[0]
    mismatched = [p for p in prefixes if dtypes[p] != dtypes[first]]
    if mismatched:
        raise ValueError(f"all datasets must store the same dtype: {first} has {dtypes[first].__name__}, "
                         f"{mismatched[0]} has {dtypes[mismatched[0]].__name__}")
    d, base = os.path.split(output_prefix)
    tmp = os.path.join(d, f".{base}.partial-{os.getpid()}")
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtypes[first])
    try:
        for p in prefixes:
            builder.add_index(p)
        builder.finalize(tmp + ".idx")
        commit_pair(tmp, output_prefix)
    finally:
        builder.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True,
                        help="A folder of .bin/.idx pairs, or dataset prefixes in the order to merge.")
    parser.add_argument("--output-prefix", required=True, help="Prefix of the merged .bin/.idx pair.")
    args = parser.parse_args(argv)
    prefixes = find_prefixes(args.input, args.output_prefix)
    merge(prefixes, args.output_prefix)
    print(f"merged {len(prefixes)} datasets into {args.output_prefix}.bin / .idx", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
