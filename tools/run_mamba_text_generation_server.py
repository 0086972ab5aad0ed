"""Serve a Mamba-2 or hybrid Mamba-Transformer checkpoint (pretrain_mamba.py's) over HTTP, as
Megatron's tools/run_mamba_text_generation_server.py does: the flags, endpoints and options of
tools/run_text_generation_server.py, with the model always built as a MambaModel (so a pure Mamba
checkpoint, whose flags name no hybrid pattern, is served too). The Mamba layers keep a recurrent
state cache per sequence beside the attention layers' KV cache (gigatron/core/inference/state_cache.py).

    python tools/run_mamba_text_generation_server.py --load CKPT --use-checkpoint-args \
        --tokenizer-type ... [--port 5000] [--inference-dynamic-batching] ...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from run_text_generation_server import main  # noqa: E402

if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(lambda argv=None: main(argv, mamba=True)))
