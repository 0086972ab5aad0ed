"""Generate text from a checkpoint without a server.

    python tools/generate_text.py --load CKPT --use-checkpoint-args --tokenizer-type GPT2BPETokenizer \
        --vocab-file gpt2-vocab.json --merge-file gpt2-merges.txt \
        --prompt "Once upon a time" --tokens-to-generate 40 [--temperature 0.8] [--top-k 40 | --top-p 0.9] \
        [--random-seed 1] [--greedy]

Prints the prompt followed by the generated text (one block per --prompt). Model flags as for
pretrain_gpt.py, or --use-checkpoint-args to take the model shape from the checkpoint. With
--compile-decode the decode step compiles once per batch size first; standard error says so and
how long it took.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_args(parser):
    group = parser.add_argument_group("one-shot generation")
    group.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for several)")
    group.add_argument("--tokens-to-generate", type=int, default=32)
    group.add_argument("--temperature", type=float, default=1.0)
    group.add_argument("--top-k", "--top_k", dest="top_k", type=int, default=0)
    group.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=0.0)
    group.add_argument("--greedy", action="store_true", help="same as --top-k 1")
    group.add_argument("--random-seed", type=int, default=-1)
    group.add_argument("--add-BOS", dest="add_BOS", action="store_true")
    group.add_argument("--max-batch-size", type=int, default=8)
    group.add_argument("--inference-max-seq-length", type=int, default=None)
    group.add_argument("--cuda-graphs", action="store_true", help="capture the decode step in CUDA graphs (GPU only)")
    group.add_argument("--compile-decode", action="store_true",
                       help="compile the decode step with torch.compile (on a GPU also captured in CUDA graphs)")
    return parser


def _announce_compiles() -> None:
    """Show the engine's compile messages (which shape, how long) on standard error."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("gigatron.inference.engine")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def main(argv=None) -> int:
    import torch.distributed as dist

    from gigatron.core.inference.broadcast import LocalRunner
    from gigatron.core.inference.engine import SamplingParams
    from gigatron.training.arguments import parse_args
    from run_text_generation_server import build_engine_from_args

    args = parse_args(argv, extra_args_provider=add_args,
                      defaults={"no_load_rng": True, "no_load_optim": True, "exit_on_missing_checkpoint": True})
    params = SamplingParams(tokens_to_generate=args.tokens_to_generate, temperature=args.temperature,
                            top_k=1 if args.greedy else args.top_k, top_p=args.top_p, random_seed=args.random_seed,
                            add_BOS=args.add_BOS)
    try:
        engine, run = build_engine_from_args(args)
        if args.compile_decode and run.rank == 0:
            _announce_compiles()
        prompt_tokens = engine.tokenize_prompts(args.prompt, args.add_BOS)
        n = engine.max_batch_size
        texts = []
        for lo in range(0, len(prompt_tokens), n):
            # Every rank runs the same generation (the broadcast is not needed: all ranks read the
            # same flags), so tensor-parallel launches work too.
            runner = LocalRunner(engine)
            texts += runner.generate_tokens(prompt_tokens[lo: lo + n], params).texts
        if run.rank == 0:
            for text in texts:
                print(text)
                print()
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(main))
