"""Serve a checkpoint over HTTP (Megatron's tools/run_text_generation_server.py).

    python tools/run_text_generation_server.py <model flags> --load CKPT [--use-checkpoint-args] \
        [--tokenizer-type ... ] [--port 5000] [--host 127.0.0.1] [--temperature 1.0] [--top_k 0] \
        [--top_p 0.0] [--return-log-probs] [--num-tokens-to-generate 30] [--max-batch-size 8] \
        [--max-request-bytes 8388608] [--cuda-graphs | --compile-decode]
    torchrun --nproc-per-node 2 tools/run_text_generation_server.py --tensor-model-parallel-size 2 ...

Endpoints: PUT /api (Megatron's fields), POST /v1/completions and /v1/chat/completions (OpenAI's
API, stream=true for server-sent events; the chat route uses the tokenizer's chat template or
--chat-template FILE), GET /v1/models, GET /health. With tensor parallelism rank 0 serves and the
other ranks follow its broadcasts. The server binds to 127.0.0.1 unless --host says otherwise.
With --compile-decode the decode step of one row is compiled (and on a GPU captured) before the
server starts listening, saying so and how long it took; each other batch size a request brings
compiles at its first use, logged the same way.
Example:
    curl 'http://localhost:5000/api' -X 'PUT' -H 'Content-Type: application/json; charset=UTF-8' \
         -d '{"prompts":["Hello world"], "tokens_to_generate":1}'
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gigatron.core.inference.server.validation import DEFAULT_MAX_REQUEST_BYTES  # noqa: E402


def add_text_generate_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("text generation")
    group.add_argument("--port", type=int, default=5000, help="HTTP port of the server")
    group.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1; 0.0.0.0 serves every interface)")
    group.add_argument("--temperature", type=float, default=1.0, help="default sampling temperature")
    group.add_argument("--top_k", "--top-k", dest="top_k", type=int, default=0,
                       help="default top-k (0 = off, 1 = greedy)")
    group.add_argument("--top_p", "--top-p", dest="top_p", type=float, default=0.0, help="default top-p (0 = off)")
    group.add_argument("--return-log-probs", action="store_true", help="return log-probabilities by default")
    group.add_argument("--num-tokens-to-generate", type=int, default=30, help="default tokens to generate")
    group.add_argument("--max-batch-size", type=int, default=8,
                       help="rows generated together; larger requests run in consecutive batches")
    group.add_argument("--inference-max-seq-length", type=int, default=None,
                       help="KV cache length (default --max-position-embeddings, else --seq-length)")
    group.add_argument("--cuda-graphs", action="store_true",
                       help="capture the decode step in CUDA graphs (GPU only)")
    group.add_argument("--compile-decode", action="store_true",
                       help="compile the decode step with torch.compile (on a GPU also captured in CUDA graphs): the "
                            "fastest decode; one row compiles before serving, each other batch size at its first "
                            "request (tens of seconds each)")
    group.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                       help="largest request body served; larger ones get HTTP 413 (default 8 MiB)")
    group.add_argument("--inference-dynamic-batching", action="store_true",
                       help="continuous batching: requests join and leave one running batch at every decode step "
                            "(one process; see docs/architecture.md, Inference)")
    group.add_argument("--inference-max-requests", type=int, default=None,
                       help="with --inference-dynamic-batching: KV-cache slots, i.e. sequences decoded together; "
                            "more wait in a queue (default --max-batch-size)")
    group.add_argument("--inference-dynamic-batching-buffer-size-gb", type=float, default=None,
                       help="with --inference-dynamic-batching: the KV-cache memory; the slots are as many as fit "
                            "(at most --inference-max-requests where given)")
    group.add_argument("--inference-prefill-chunk-size", type=int, default=256,
                       help="with --inference-dynamic-batching: prompt tokens read per step, so that a long prompt "
                            "does not stall the sequences being decoded")
    group.add_argument("--max-tokens-to-oom", type=int, default=None,
                       help="refuse (HTTP 400) a request whose rows times (longest prompt + tokens to generate) "
                            "exceed this, before it can run out of memory (default: no limit; with "
                            "--inference-dynamic-batching the slots are the cap and requests queue)")
    group.add_argument("--chat-template", default=None,
                       help="Jinja chat template of /v1/chat/completions (a file, or a tokenizer_config.json "
                            "holding one); default: the tokenizer's own, if it has one")
    group.add_argument("--served-model-name", default="gigatron",
                       help="the model id of GET /v1/models, which OpenAI requests name in 'model'")
    return parser


def warm_up_decode(engine, announce: bool = True) -> float:
    """Compile (and on a GPU capture) the decode step of one row now, so that the first request
    does not wait for it: a two-token greedy generation, on every rank of a tensor-parallel run
    (each joins the collectives). Prints what it does and how long it took where `announce`;
    returns the seconds."""
    from gigatron.core.inference.engine import SamplingParams

    if announce:
        print("compiling the decode step (--compile-decode; once per batch size, tens of seconds) ...", flush=True)
    start = time.perf_counter()
    engine.generate_tokens([[engine.eod]], SamplingParams(tokens_to_generate=2, top_k=1, stop_at_eod=False))
    seconds = time.perf_counter() - start
    if announce:
        print(f"compiled the decode step in {seconds:.1f} s", flush=True)
    return seconds


def chat_template_from_args(args, tokenizer):
    """--chat-template FILE, else the tokenizer's own template (from --tokenizer-model), else None
    (then /v1/chat/completions answers 400 saying so)."""
    from gigatron.core.inference.server.chat import find_chat_template, load_chat_template

    if getattr(args, "chat_template", None):
        return load_chat_template(args.chat_template)
    return find_chat_template(tokenizer, getattr(args, "tokenizer_model", None))


def dynamic_slots(args, engine):
    """The continuous batch's slots: --inference-max-requests, capped by what
    --inference-dynamic-batching-buffer-size-gb holds; None: --max-batch-size."""
    from gigatron.core.inference.continuous import slots_for_buffer

    slots = getattr(args, "inference_max_requests", None)
    buffer_gb = getattr(args, "inference_dynamic_batching_buffer_size_gb", None)
    if buffer_gb is not None:
        fit = slots_for_buffer(engine.model, engine.max_sequence_length, buffer_gb)
        slots = fit if slots is None else min(slots, fit)
    return slots


def decode_mode_from_args(args) -> str:
    """--compile-decode -> "compiled", --cuda-graphs -> "cuda_graph", else "eager"."""
    if getattr(args, "compile_decode", False):
        return "compiled"
    return "cuda_graph" if args.cuda_graphs else "eager"


def build_engine_from_args(args, mamba: bool = False):
    """Initialize (torch.distributed when launched with torchrun), build the model and tokenizer,
    load --load and return (engine, groups). The model is a MambaModel (pretrain_mamba.py's) where
    `mamba` is set or the flags describe one (a hybrid pattern or ratio, --is-hybrid-model, or
    --spec of the Mamba stack; with --use-checkpoint-args the checkpoint's), else a GPTModel."""
    from gigatron.core.inference.engine import InferenceEngine
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.training import validate
    from gigatron.training.arguments import configs_from_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint
    from gigatron.training.initialize import initialize

    if not args.load:
        raise ValueError("give the checkpoint to serve with --load")
    if args.use_checkpoint_args:
        load_args_from_checkpoint(args)
    if getattr(args, "virtual_pipeline_model_parallel_size", None):
        raise ValueError("generation does not support --virtual-pipeline-model-parallel-size; drop it")
    if args.pipeline_model_parallel_size != 1 or args.context_parallel_size != 1:
        raise ValueError("generation runs with --pipeline-model-parallel-size 1 and --context-parallel-size 1; "
                         "convert the checkpoint to tensor parallelism only (tools/checkpoint/convert.py)")
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    args.world_size = world_size
    args.data_parallel_size = validate.check_parallel_sizes(args, world_size)
    if args.data_parallel_size != 1:
        raise ValueError(f"{world_size} processes with --tensor-model-parallel-size {args.tensor_model_parallel_size}: "
                         "a generation server uses exactly tensor-model-parallel-size processes")
    # Heads, query groups, positions and precision are checked by the configs (configs_from_args below).
    # One token per step cannot be split over sequence-parallel ranks; dropout is off for inference.
    args.sequence_parallel = False
    args.attention_dropout = 0.0
    args.hidden_dropout = 0.0
    args.recompute_granularity = None
    configs = configs_from_args(args)
    run = initialize(args, configs)
    if getattr(args, "tokenizer_type", None) is None and getattr(args, "vocab_size", None) is not None:
        args.tokenizer_type = "NullTokenizer"
    if getattr(args, "tokenizer_type", None) is None:
        raise ValueError("give --tokenizer-type (with its files), or --vocab-size V for a NullTokenizer")
    tokenizer = build_tokenizer(args)
    padded = vocab_size_with_padding(tokenizer.vocab_size, args.make_vocab_size_divisible_by, run.groups.tp.size)
    from gigatron.training.mamba import check_mamba_args, is_mamba_run
    if mamba or is_mamba_run(args):
        from gigatron.core.models.mamba import MambaModel
        check_mamba_args(args)
        model = MambaModel(configs.transformer, configs.mamba, run.groups, padded, seed=args.seed,
                           moe_config=getattr(configs, "moe", None)).to(run.device)
    else:
        model = GPTModel(configs.transformer, run.groups, padded, seed=args.seed).to(run.device)
    load_checkpoint(args.load, [model], None, None, run.groups, ckpt_step=getattr(args, "ckpt_step", None),
                    load_optim=False, load_rng=False, exit_on_missing_checkpoint=True, rng_tracker=run.rng_tracker,
                    finetune=True)
    model.eval()
    engine = InferenceEngine(model, tokenizer, groups=run.groups, max_batch_size=args.max_batch_size,
                             max_sequence_length=args.inference_max_seq_length,
                             decode_mode=decode_mode_from_args(args))
    return engine, run


def main(argv=None, mamba: bool = False) -> int:
    """mamba: serve a Mamba / hybrid model even where the flags do not say so (a pure Mamba
    checkpoint: tools/run_mamba_text_generation_server.py)."""
    from gigatron.core.inference.broadcast import LeaderRunner, LocalRunner, follower_loop
    from gigatron.core.inference.server.app import build_app, serve
    from gigatron.core.inference.server.validation import ServerDefaults
    from gigatron.training.arguments import parse_args

    import torch.distributed as dist

    args = parse_args(argv, extra_args_provider=add_text_generate_args,
                      defaults={"no_load_rng": True, "no_load_optim": True, "exit_on_missing_checkpoint": True})
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes must be >= 1, got {args.max_request_bytes}")
    if args.inference_dynamic_batching and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise ValueError("--inference-dynamic-batching serves from one process; drop it or run without torchrun")
    for flag in ("inference_max_requests", "inference_prefill_chunk_size", "max_tokens_to_oom"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.chat_template:
        from gigatron.core.inference.server.chat import load_chat_template
        load_chat_template(args.chat_template)  # a missing or empty file fails before the model loads
    engine, run = build_engine_from_args(args, mamba=mamba)
    try:
        if run.rank == 0:
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
        if args.compile_decode:
            warm_up_decode(engine, announce=run.rank == 0)
        if run.rank != 0:
            follower_loop(engine)
            return 0
        runner = LeaderRunner(engine) if run.world_size > 1 else LocalRunner(engine)
        defaults = ServerDefaults(tokens_to_generate=args.num_tokens_to_generate, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, logprobs=args.return_log_probs)
        app = build_app(runner, engine.tokenizer, max_batch_size=args.max_batch_size,
                        max_sequence_length=engine.max_sequence_length, defaults=defaults,
                        max_request_bytes=args.max_request_bytes, model_name=args.served_model_name,
                        chat_template=chat_template_from_args(args, engine.tokenizer),
                        dynamic_batching=args.inference_dynamic_batching, max_requests=dynamic_slots(args, engine),
                        prefill_chunk=args.inference_prefill_chunk_size, max_tokens_to_oom=args.max_tokens_to_oom)
        serve(app, host=args.host, port=args.port)
        return 0
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    from gigatron.cli import run_cli

    sys.exit(run_cli(main))
