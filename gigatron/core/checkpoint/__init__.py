"""Checkpoint files: one module per on-disk format behind one registry.

    formats.py        the registry: detect_format, locate, read_model, read_args, get_format
    torch_layout.py   Megatron's `torch` layout (one file per model-parallel rank, checksums.json)
    dist/             the parallelism-independent `torch_dist` format
    megatron_dist.py  Megatron-Core's own torch_dist (read; write for convert.py --saver megatron_dist)
    megatron_torch.py Megatron-LM's own `torch` files     legacy.py  pre-Megatron-Core names
    megatron_names.py Megatron's key names <-> ours       megatron_pickle.py  the allow-list for its pickles
    foreign.py        full tensors -> a model at any parallel layout
    header.py         the header every checkpoint carries     paths.py  tracker and iteration dirs
    io.py             atomic writes, checksums, weights-only loads     tp_layout.py  tp shards
    state.py          ModelState / TrainingState, what the formats return

Importing this package loads nothing else (so that `gigatron.cli` can tell whether checkpoint
errors are in play without importing torch).
"""
