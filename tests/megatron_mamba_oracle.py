"""Upstream Megatron-Core's MambaModel as a checkpoint oracle, built on the CPU without mamba_ssm,
causal_conv1d, einops or Transformer Engine (run as a script in tp processes; tests/megatron_oracle.py
sets up torch.distributed and Megatron's parallel state):

    python tests/megatron_mamba_oracle.py write --root DIR     (WORLD_SIZE = tp ranks)
        Megatron-Core saves its hybrid MambaModel ("M*M-") with dist_checkpointing.save
        (DIR/iter_0000007, common.pt with the args Namespace) and as Megatron-LM's `torch` rank
        files (DIR/torch/iter_0000007/mp_rank_TT/model_optim_rng.pt, its state_dict_for_save_checkpoint);
        DIR/weights_rank{r}.pt: each rank's own parameters (model.state_dict()).
    python tests/megatron_mamba_oracle.py load --root DIR --iter-dir X [Y ...]
        Megatron-Core builds the model with other weights, loads each directory with
        dist_checkpointing.load into its sharded_state_dict and load_state_dict(strict=True);
        DIR/loaded{i}_rank{r}.pt: each rank's parameters after loading the i-th.

What stands in for the missing packages, and why the checkpoint is still Megatron-Core's own:
MambaMixer, MambaLayer, MambaStack and MambaModel are megatron-core 0.16.1's classes and write their
own sharded_state_dict (per-layer keys, the mixer's in_proj / conv1d split into z/x/B/C/dt parts,
tensor-parallel sharding); the layer spec uses Megatron-Core's local modules (ColumnParallelLinear,
RowParallelLinear, its torch norms) where its Mamba spec names Transformer Engine's, with the
`sharded_state_dict_keys_map` by which a local spec writes Transformer Engine's fused-norm names
(Megatron-Core's own GPT local spec maps input_layernorm / pre_mlp_layernorm this way; the Mamba
layer's norm, fused into in_proj by Transformer Engine, maps to `mixer.in_proj.layer_norm_`); the
gated RMSNorm of mamba_ssm is a parameter holder whose sharded_state_dict shards its weight on
axis 0, as Megatron's ExtendedRMSNorm documents. Forward passes need mamba_ssm's kernels and are
never run: the weights are the oracle."""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import megatron_oracle as oracle  # noqa: E402

VOCAB, HIDDEN, FFN, HEADS, QUERY_GROUPS = 64, 32, 48, 4, 2
HEAD_DIM, GROUPS, STATE = 8, 2, 8
PATTERN = "M*M-"
ITERATION = 7


def _stand_ins() -> None:
    """Let megatron-core's Mamba classes build without mamba_ssm / einops / Transformer Engine."""
    from torch import nn

    from megatron.core.ssm import mamba_block, mamba_context_parallel, mamba_mixer
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    class GatedNorm(nn.Module):
        """mamba_ssm's RMSNorm(gated) parameters; sharded on axis 0 like Megatron's ExtendedRMSNorm."""

        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=False, device=None, dtype=None):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype))

        def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
            return make_sharded_tensors_for_checkpoint(self.state_dict(prefix="", keep_vars=True), prefix,
                                                       {"weight": 0}, sharded_offsets)

    mamba_mixer.HAVE_MAMBA_SSM = mamba_mixer.HAVE_EINOPS = mamba_context_parallel.HAVE_EINOPS = True
    mamba_mixer.ExtendedRMSNorm = GatedNorm
    mamba_block.TENorm = WrappedTorchNorm


def build_model(seed: int):
    """Megatron-Core's MambaModel ("M*M-", RMSNorm, SwiGLU, GQA, untied output) on this rank."""
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.mamba import MambaModel
    from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
    from megatron.core.ssm.mamba_layer import MambaLayer, MambaLayerSubmodules
    from megatron.core.ssm.mamba_mixer import MambaMixer, MambaMixerSubmodules
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

    _stand_ins()
    local = get_gpt_layer_local_spec(normalization="RMSNorm").submodules
    keys_map = local.sharded_state_dict_keys_map
    spec = ModuleSpec(module=MambaStack, submodules=MambaStackSubmodules(
        mamba_layer=ModuleSpec(module=MambaLayer, submodules=MambaLayerSubmodules(
            norm=WrappedTorchNorm, mamba_bda=get_bias_dropout_add,
            mixer=ModuleSpec(module=MambaMixer, submodules=MambaMixerSubmodules(in_proj=ColumnParallelLinear,
                                                                                  out_proj=RowParallelLinear)),
            sharded_state_dict_keys_map={"norm.": "mixer.in_proj.layer_norm_"})),
        attention_layer=ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=local.input_layernorm, self_attention=local.self_attention,
            self_attn_bda=local.self_attn_bda, sharded_state_dict_keys_map=keys_map)),
        mlp_layer=ModuleSpec(module=MLPLayer, submodules=TransformerLayerSubmodules(
            pre_mlp_layernorm=local.pre_mlp_layernorm, mlp=local.mlp, mlp_bda=local.mlp_bda,
            sharded_state_dict_keys_map=keys_map))))
    torch.manual_seed(seed)
    config = TransformerConfig(
        num_layers=len(PATTERN), hidden_size=HIDDEN, ffn_hidden_size=FFN, num_attention_heads=HEADS,
        num_query_groups=QUERY_GROUPS, normalization="RMSNorm", gated_linear_unit=True, add_bias_linear=False,
        activation_func=torch.nn.functional.silu, bias_activation_fusion=False, masked_softmax_fusion=False,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False, hidden_dropout=0.0,
        attention_dropout=0.0, use_cpu_initialization=True, tensor_model_parallel_size=oracle._tp_size(),
        pipeline_dtype=torch.float32, layernorm_epsilon=1e-5, init_method_std=0.05, mamba_state_dim=STATE,
        mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS)
    with oracle.cpu_only():
        model = MambaModel(config, spec, vocab_size=VOCAB, max_sequence_length=16, hybrid_override_pattern=PATTERN,
                           share_embeddings_and_output_weights=False)
    with torch.no_grad():  # every tensor random (and rank-dependent), so that a misplaced slice shows
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def megatron_args(tp: int) -> argparse.Namespace:
    """pretrain_mamba.py's args Namespace for this model (the flags Gigatron reads back)."""
    return oracle.megatron_args(
        "llama", num_layers=len(PATTERN), hidden=HIDDEN, heads=HEADS, ffn=FFN, tp=tp, iteration=ITERATION,
        num_query_groups=QUERY_GROUPS, position_embedding_type="none", padded_vocab_size=VOCAB, vocab_size=VOCAB - 1,
        make_vocab_size_divisible_by=32, hybrid_override_pattern=PATTERN, is_hybrid_model=True,
        mamba_state_dim=STATE, mamba_head_dim=HEAD_DIM, mamba_num_groups=GROUPS, mamba_num_heads=None,
        hybrid_attention_ratio=0.0, hybrid_mlp_ratio=0.0, spec=None, transformer_impl="transformer_engine",
        max_position_embeddings=16)


def _weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}


def _main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["write", "load"])
    parser.add_argument("--root", required=True)
    parser.add_argument("--iter-dir", nargs="+", default=[])
    parser.add_argument("--port", type=int, default=29650)
    opts = parser.parse_args(argv)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    oracle.init_parallel(tp, 1, opts.port)
    if opts.command == "write":
        model = build_model(seed=1234)
        args = megatron_args(tp)
        state = oracle._sharded_common(args, ITERATION)
        state["model"] = model.sharded_state_dict()
        oracle.save_dist(state, os.path.join(opts.root, f"iter_{ITERATION:07d}"))
        torch_root = os.path.join(opts.root, "torch")
        path = os.path.join(torch_root, f"iter_{ITERATION:07d}", f"mp_rank_{rank:02d}", "model_optim_rng.pt")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save(oracle.torch_state(model, argparse.Namespace(**dict(vars(args), ckpt_format="torch")), ITERATION),
                   path)
        if rank == 0:
            oracle.write_tracker(opts.root, ITERATION)
            oracle.write_tracker(torch_root, ITERATION)
        torch.save(_weights(model), os.path.join(opts.root, f"weights_rank{rank}.pt"))
    else:
        from megatron.core import dist_checkpointing

        for i, iter_dir in enumerate(opts.iter_dir):
            model = build_model(seed=99)
            with oracle.cpu_only():
                loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, iter_dir)
            model.load_state_dict(loaded["model"], strict=True)
            torch.save(_weights(model), os.path.join(opts.root, f"loaded{i}_rank{rank}.pt"))
    oracle.destroy_parallel()


def run(*argv: str, processes: int, port: int, timeout: int = 300) -> None:
    oracle.run_oracle(*argv, processes=processes, port=port, timeout=timeout, script=os.path.abspath(__file__))


if __name__ == "__main__":
    _main()
