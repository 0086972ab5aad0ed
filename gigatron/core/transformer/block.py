"""TransformerBlock: the decoder layers of one pipeline stage (and the final norm on the last one).

Shape legend: s = sequence (s/tp with sequence parallelism), b = micro-batch, h = hidden size.

Layer placement follows Megatron: without an uneven split each pipeline rank holds
num_layers / pp layers; --decoder-first/last-pipeline-num-layers fix the first/last stage and
spread the rest evenly. With v virtual stages each rank's layers are cut into v equal chunks and
chunk (vp_stage, pp_rank) holds the layers after all chunks of earlier virtual stages and after
chunks of earlier pipeline ranks of the same virtual stage.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import nn

__all__ = ["num_layers_on_stage", "layer_offset", "check_pipeline_split", "TransformerBlock"]


def _layers_per_pipeline_rank(config, pp_size: int) -> List[int]:
    """Number of layers each pipeline rank holds (all its virtual stages together)."""
    total = config.num_layers
    first = config.decoder_first_pipeline_num_layers
    last = config.decoder_last_pipeline_num_layers
    if pp_size == 1:
        if first is not None or last is not None:
            raise ValueError("--decoder-first/last-pipeline-num-layers need --pipeline-model-parallel-size > 1")
        return [total]
    for name, value in (("--decoder-first-pipeline-num-layers", first),
                        ("--decoder-last-pipeline-num-layers", last)):
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    middle_layers = total - (first or 0) - (last or 0)
    middle_stages = pp_size - (first is not None) - (last is not None)
    if middle_layers < 0:
        raise ValueError(
            f"--decoder-first-pipeline-num-layers ({first}) + --decoder-last-pipeline-num-layers ({last}) "
            f"exceed --num-layers ({total})")
    if middle_stages == 0:
        if middle_layers != 0:
            raise ValueError(
                f"with --pipeline-model-parallel-size {pp_size} the first ({first}) and last ({last}) "
                f"stages hold all layers, but --num-layers is {total}")
        per_middle = 0
    else:
        if middle_layers % middle_stages != 0:
            if first is None and last is None:
                raise ValueError(
                    f"--num-layers ({total}) is not divisible by --pipeline-model-parallel-size "
                    f"({pp_size}); change one of them or set --decoder-first/last-pipeline-num-layers")
            raise ValueError(
                f"the {middle_layers} layers left after the first ({first}) and last ({last}) stages do "
                f"not divide over the {middle_stages} middle pipeline stages; adjust "
                "--decoder-first/last-pipeline-num-layers or --num-layers")
        per_middle = middle_layers // middle_stages
    counts = [per_middle] * pp_size
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts


def _chunk_counts(config, pp_size: int, vp_size: Optional[int]) -> List[List[int]]:
    """counts[vp_stage][pp_rank]: layers of each model chunk."""
    per_rank = _layers_per_pipeline_rank(config, pp_size)
    v = vp_size or 1
    for rank, n in enumerate(per_rank):
        if n % v != 0:
            raise ValueError(
                f"pipeline rank {rank} holds {n} layers, which do not split into "
                f"--virtual-pipeline-model-parallel-size ({v}) equal chunks; adjust --num-layers, "
                "the virtual stage count or --decoder-first/last-pipeline-num-layers")
    return [[n // v for n in per_rank] for _ in range(v)]


def _check_stage(pp_rank, pp_size, vp_stage, vp_size):
    if not 0 <= pp_rank < pp_size:
        raise ValueError(f"pipeline rank {pp_rank} is outside [0, {pp_size})")
    if vp_size is None:
        if vp_stage not in (None, 0):
            raise ValueError(f"vp_stage {vp_stage} given without virtual pipeline stages")
    elif vp_stage is None or not 0 <= vp_stage < vp_size:
        raise ValueError(f"vp_stage {vp_stage} is outside [0, {vp_size}) virtual stages")


def num_layers_on_stage(config, pp_rank: int, pp_size: int, vp_stage: Optional[int] = None,
                        vp_size: Optional[int] = None) -> int:
    """Number of decoder layers built on pipeline rank `pp_rank` (virtual stage `vp_stage`)."""
    _check_stage(pp_rank, pp_size, vp_stage, vp_size)
    return _chunk_counts(config, pp_size, vp_size)[vp_stage or 0][pp_rank]


def layer_offset(config, pp_rank: int, pp_size: int, vp_stage: Optional[int] = None,
                 vp_size: Optional[int] = None) -> int:
    """Global number of the first layer of this stage (local layer i is global i + offset)."""
    _check_stage(pp_rank, pp_size, vp_stage, vp_size)
    counts = _chunk_counts(config, pp_size, vp_size)
    v = vp_stage or 0
    return sum(sum(row) for row in counts[:v]) + sum(counts[v][:pp_rank])


def check_pipeline_split(config, pp_size: int, vp_size: Optional[int]) -> None:
    """Raise ValueError (naming the numbers) if the layers do not split over the stages."""
    _chunk_counts(config, pp_size, vp_size)


class TransformerBlock(nn.Module):
    """The decoder layers of one pipeline stage.

    forward(hidden [s, b, h] | None, attention_mask, rotary_pos_emb) -> [s, b, h]; stages after the
    first take their input from set_input_tensor instead of `hidden`.
    """

    def __init__(self, config, groups, post_process: bool = True, vp_stage: Optional[int] = None,
                 pre_process: bool = True, moe_config=None, layer_spec=None):
        super().__init__()
        from gigatron.core.transformer.layer import TransformerLayer
        from gigatron.core.transformer.norm import build_norm

        self.config = config
        self.groups = groups
        self.pre_process = pre_process
        self.post_process = post_process
        pp_rank, pp_size, vp_size = groups.pp.rank, groups.pp.size, groups.vp_size
        if pp_size != config.pipeline_model_parallel_size:
            raise ValueError(
                f"the pipeline group has {pp_size} ranks but --pipeline-model-parallel-size is "
                f"{config.pipeline_model_parallel_size}; build the groups from the same config")
        if vp_size != config.virtual_pipeline_model_parallel_size:
            raise ValueError(
                f"the groups have {vp_size} virtual pipeline stages but "
                f"--virtual-pipeline-model-parallel-size is {config.virtual_pipeline_model_parallel_size}; "
                "build the groups from the same config")
        if vp_size is None and vp_stage not in (None, 0):
            raise ValueError(f"vp_stage {vp_stage} given but the groups have no virtual stages")
        if vp_size is not None and vp_stage is None:
            vp_stage = 0
        self.vp_stage = vp_stage
        self.num_local_layers = num_layers_on_stage(config, pp_rank, pp_size, vp_stage, vp_size)
        self.layer_offset = layer_offset(config, pp_rank, pp_size, vp_stage, vp_size)
        # layer_spec (--spec): a callable building each layer in place of TransformerLayer.
        build_layer = TransformerLayer if layer_spec is None else layer_spec
        self.layers = nn.ModuleList(
            build_layer(config, groups, layer_number=self.layer_offset + i, moe_config=moe_config)
            for i in range(self.num_local_layers))
        if post_process:
            self.final_layernorm = build_norm(config, config.hidden_size, groups,
                                              init_key="decoder.final_layernorm")
        else:
            self.final_layernorm = None
        self.input_tensor = None

    def set_input_tensor(self, tensor: Optional[torch.Tensor]) -> None:
        """Input of a stage after the first: [s, b, h] (or [s/tp, b, h] with sequence parallel)."""
        self.input_tensor = tensor

    def _run_layers(self, start: int, end: int, hidden, attention_mask, rotary_pos_emb, inference_context=None):
        for layer in self.layers[start:end]:
            if inference_context is None:
                hidden = layer(hidden, attention_mask, rotary_pos_emb)
            else:
                hidden = layer(hidden, attention_mask, rotary_pos_emb, inference_context=inference_context)
            router = getattr(getattr(layer, "mlp", None), "router", None)
            if router is not None and router.pending_aux_losses:
                router.flush_aux_losses()  # values a compiled MoE layer queued (TopKRouter._record)
        return hidden

    def _forward_full_recompute(self, hidden, attention_mask, rotary_pos_emb):
        from gigatron.core.parallel.random import checkpoint

        cfg = self.config
        n = self.num_local_layers
        distribute = cfg.distribute_saved_activations

        def chunk_fn(start, end):
            def run(x, mask, rope):
                return self._run_layers(start, end, x, mask, rope)
            return run

        if cfg.recompute_method == "uniform":
            # Checkpoint the inputs of chunks of recompute_num_layers layers; recompute each chunk.
            step = cfg.recompute_num_layers
            for start in range(0, n, step):
                end = min(start + step, n)
                hidden = checkpoint(chunk_fn(start, end), distribute, hidden, attention_mask, rotary_pos_emb,
                                    tp=self.groups.tp)
            return hidden
        # block: the first recompute_num_layers layers of this stage are recomputed one by one.
        num_recomputed = min(cfg.recompute_num_layers, n)
        for i in range(n):
            if i < num_recomputed:
                hidden = checkpoint(chunk_fn(i, i + 1), distribute, hidden, attention_mask, rotary_pos_emb,
                                    tp=self.groups.tp)
            else:  # through _run_layers too: it empties the aux-loss queue of a compiled MoE layer
                hidden = self._run_layers(i, i + 1, hidden, attention_mask, rotary_pos_emb)
        return hidden

    def forward(self, hidden: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor] = None,
                rotary_pos_emb=None, inference_context=None) -> torch.Tensor:
        if not self.pre_process:
            if self.input_tensor is None:
                raise RuntimeError("a pipeline stage after the first needs set_input_tensor() before forward")
            hidden = self.input_tensor
        if self.config.recompute_granularity == "full" and self.training and torch.is_grad_enabled():
            hidden = self._forward_full_recompute(hidden, attention_mask, rotary_pos_emb)
        else:
            hidden = self._run_layers(0, self.num_local_layers, hidden, attention_mask, rotary_pos_emb,
                                      inference_context)
        if self.final_layernorm is not None:
            hidden = self.final_layernorm(hidden)
        return hidden
