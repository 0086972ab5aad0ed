"""Checkpoint files: one module per on-disk format behind one registry.

    formats.py        the registry: detect_format, locate, read_model, read_args, get_format
    torch_layout.py   Megatron's `torch` layout (one file per model-parallel rank, checksums.json)
    dist/             the parallelism-independent `torch_dist` format
    header.py         the header every checkpoint carries     paths.py  tracker and iteration dirs
    io.py             atomic writes, checksums, weights-only loads     tp_layout.py  tp shards
    state.py          ModelState / TrainingState, what the formats return

Importing this package loads nothing else (so that `gigatron.cli` can tell whether checkpoint
errors are in play without importing torch).
"""
