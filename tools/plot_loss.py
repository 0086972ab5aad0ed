"""Plot training and validation loss from Megatron-format training logs.

    python tools/plot_loss.py train.log [more.log ...] --output loss.png [--key "lm loss"]

Reads the `iteration N/M | ... | lm loss: X |` lines and the `validation loss at iteration N |
lm loss value: X |` lines (Gigatron's and Megatron's logs alike). Logs of a resumed run can be
given in order; a later log overrides earlier values of the same iteration.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable

from gigatron.training.logging import write_loss_curve

_ITERATION = re.compile(r"\biteration\s+(\d+)/\s*\d+\s*\|")
_VALIDATION = re.compile(r"validation loss at iteration (\d+)(?: on validation set)?\s*\|")


def parse_log(lines: Iterable[str], key: str = "lm loss") -> tuple[dict[int, float], dict[int, float]]:
    """(training, validation) loss by iteration from log lines."""
    train_value = re.compile(re.escape(key) + r":\s*([-+0-9.eEnaif]+)\s*\|")
    valid_value = re.compile(re.escape(key) + r" value:\s*([-+0-9.eEnaif]+)\s*\|")
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for line in lines:
        if "on test set" in line:
            continue
        match = _VALIDATION.search(line)
        if match:
            value = valid_value.search(line)
            if value:
                valid[int(match.group(1))] = float(value.group(1))
            continue
        match = _ITERATION.search(line)
        if match:
            value = train_value.search(line)
            if value:
                train[int(match.group(1))] = float(value.group(1))
    return train, valid


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss curves from Megatron-format training logs.")
    parser.add_argument("logs", nargs="+", help="log files ('-' for standard input)")
    parser.add_argument("--output", default="loss_curve.png", help="PNG to write")
    parser.add_argument("--key", default="lm loss", help="loss name in the log line")
    parser.add_argument("--title", default=None, help="plot title")
    args = parser.parse_args(argv)
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for path in args.logs:
        handle = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="replace")
        with handle:
            t, v = parse_log(handle, args.key)
        train.update(t)
        valid.update(v)
    if not train and not valid:
        print(f"no '{args.key}' values found in {', '.join(args.logs)}", file=sys.stderr)
        return 1
    write_loss_curve(args.output, sorted(train.items()), sorted(valid.items()), title=args.title or args.key)
    print(f"wrote {args.output}: {len(train)} training and {len(valid)} validation points")
    return 0


if __name__ == "__main__":
    sys.exit(main())
