"""Layout-independent initialization: the same seed gives the same full tensors at tp=1 and tp=2
(including stride-2 fused weights), in any parameter dtype, with or without explicit keys.

Tensor-parallel shards are built in one process with Group(size=2, rank=r): construction and
initialization do not communicate."""

from types import SimpleNamespace

import pytest
import torch

from gigatron.core.parallel.groups import Group
from gigatron.core.parallel.init import full_shape, initialize_parameters, local_shard
from gigatron.core.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from gigatron.core.parallel.tags import (
    init_spec,
    partition_dim,
    partition_stride,
    set_init,
    set_tensor_parallel_attributes,
)

H, FFN, V = 8, 16, 32


def config(dtype=torch.float32):
    # Stand-in for TransformerConfig: only the attributes the layers read.
    return SimpleNamespace(sequence_parallel=False, params_dtype=dtype, use_cpu_initialization=True,
                           perform_initialization=True)


def normal_init(tensor):
    return torch.nn.init.normal_(tensor, std=0.02)


class TinyBlock(torch.nn.Module):
    """Embedding, a SwiGLU-style fc1 (stride 2), fc2, a norm weight and a tied output layer."""

    def __init__(self, tp: Group, layer: int, keyed: bool = True, dtype=torch.float32):
        super().__init__()
        key = (lambda name: name) if keyed else (lambda name: None)
        cfg = config(dtype)
        self.word_embeddings = VocabParallelEmbedding(V, H, config=cfg, tp=tp, init_method=normal_init,
                                                      init_key=key("embedding.word_embeddings"))
        self.fc1 = ColumnParallelLinear(H, 2 * FFN, config=cfg, tp=tp, init_method=normal_init, stride=2,
                                        init_key=key(f"decoder.layers.{layer}.mlp.linear_fc1"))
        self.fc2 = RowParallelLinear(FFN, H, config=cfg, tp=tp, init_method=normal_init,
                                     init_key=key(f"decoder.layers.{layer}.mlp.linear_fc2"))
        self.norm = torch.nn.Parameter(torch.empty(H, dtype=dtype))
        set_init(self.norm, torch.nn.init.ones_, None)
        self.output_layer = ColumnParallelLinear(H, V, config=cfg, tp=tp, init_method=normal_init, bias=False,
                                                 init_key=key("embedding.word_embeddings"))


def unshard(shards, dim, stride):
    """Inverse of local_shard: the full tensor from every rank's shard."""
    blocks = [torch.cat([s.chunk(stride, dim=dim)[j] for s in shards], dim=dim) for j in range(stride)]
    return torch.cat(blocks, dim=dim)


def full_tensors(models):
    """name -> full logical tensor, reassembled from the models of every tp rank."""
    result = {}
    for name, param in models[0].named_parameters():
        shards = [dict(m.named_parameters())[name].detach() for m in models]
        if len(models) > 1 and getattr(param, "tensor_model_parallel", False):
            result[name] = unshard(shards, partition_dim(param), partition_stride(param))
        else:
            result[name] = shards[0]
    return result


def build(tp_size, seed=1234, layer=3, keyed=True, dtype=torch.float32):
    models = []
    for rank in range(tp_size):
        model = TinyBlock(Group(group=None, size=tp_size, rank=rank, ranks=list(range(tp_size))),
                          layer, keyed, dtype)
        assert initialize_parameters(model, seed) == 7
        models.append(model)
    return full_tensors(models)


def test_tp1_and_tp2_give_the_same_full_tensors():
    serial, parallel = build(1), build(2)
    assert serial.keys() == parallel.keys()
    for name in serial:
        assert torch.equal(serial[name], parallel[name]), name
    assert serial["fc1.weight"].std() > 0.01  # filled by normal_init, not left empty
    assert torch.equal(serial["fc1.bias"], torch.zeros(2 * FFN))
    assert torch.equal(serial["norm"], torch.ones(H))
    # Tied output layer keyed like the embedding starts equal to it.
    assert torch.equal(serial["output_layer.weight"], serial["word_embeddings.weight"])
    # Different keys, different values; another seed, other values.
    assert not torch.equal(serial["fc1.weight"][:H], serial["output_layer.weight"][:H])
    assert not torch.equal(build(1, seed=99)["fc1.weight"], serial["fc1.weight"])
    assert not torch.equal(build(1, layer=4)["fc1.weight"], serial["fc1.weight"])


def test_stride_two_shards_hold_a_slice_of_each_block():
    tp = Group(group=None, size=2, rank=1, ranks=[0, 1])
    fc1 = ColumnParallelLinear(H, 2 * FFN, config=config(), tp=tp, init_method=normal_init, stride=2,
                               init_key="decoder.layers.0.mlp.linear_fc1")
    assert full_shape(fc1.weight) == (2 * FFN, H)
    initialize_parameters(fc1, 5)
    serial = ColumnParallelLinear(H, 2 * FFN, config=config(), tp=Group.single(), init_method=normal_init,
                                  stride=2, init_key="decoder.layers.0.mlp.linear_fc1")
    initialize_parameters(serial, 5)
    gate, up = serial.weight.detach().chunk(2, dim=0)
    expected = torch.cat([gate.chunk(2)[1], up.chunk(2)[1]])  # rank 1's gate rows, then its up rows
    assert torch.equal(fc1.weight.detach(), expected)
    assert torch.equal(local_shard(serial.weight.detach(), 0, 2, 1, 2), expected)


def test_unkeyed_parameters_use_their_names_and_global_name_fn():
    a, b = build(2, keyed=False), build(1, keyed=False)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # A stage-local layer name mapped to its global name gets the global layer's values.
    local = TinyBlock(Group.single(), 0, keyed=False)
    initialize_parameters(local, 1234, global_name_fn=lambda n: "decoder.layers.3.mlp.linear_fc1.weight"
                          if n == "fc1.weight" else n)
    keyed = TinyBlock(Group.single(), 3, keyed=True)
    initialize_parameters(keyed, 1234)
    assert torch.equal(local.fc1.weight, keyed.fc1.weight)
    assert init_spec(local.fc1.weight).key is None


def test_low_precision_params_get_the_rounded_full_tensor():
    fp32, bf16 = build(2), build(2, dtype=torch.bfloat16)
    for name in fp32:
        assert bf16[name].dtype == torch.bfloat16
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name


def test_errors_name_the_problem():
    p = torch.nn.Parameter(torch.empty(4, 4))
    set_tensor_parallel_attributes(p, True, 0, 1)
    set_init(p, normal_init, "w")
    holder = torch.nn.Module()
    holder.w = p
    with pytest.raises(ValueError, match="rank= and world_size="):
        initialize_parameters(holder, 0)
    meta = torch.nn.Module()
    meta.w = torch.nn.Parameter(torch.empty(4, device="meta"))
    set_init(meta.w, normal_init, "w")
    with pytest.raises(ValueError, match="meta device"):
        initialize_parameters(meta, 0)
    with pytest.raises(ValueError, match="meta device"):
        initialize_parameters(meta, 0, device="cpu")
    with pytest.raises(ValueError, match="callable"):
        set_init(p, "normal", "w")


@pytest.mark.gpu
def test_cuda_generation_is_layout_independent():
    def build_on_cuda(tp_size):
        models = []
        for rank in range(tp_size):
            model = TinyBlock(Group(group=None, size=tp_size, rank=rank, ranks=list(range(tp_size))), 3)
            initialize_parameters(model, 1234, device="cuda")
            models.append(model)
        return full_tensors(models)

    serial, parallel = build_on_cuda(1), build_on_cuda(2)
    for name in serial:
        assert torch.equal(serial[name], parallel[name]), name
    cpu_state = torch.get_rng_state()
    cuda_state = torch.cuda.get_rng_state()
    initialize_parameters(TinyBlock(Group.single(), 3), 1, device="cuda")
    assert torch.equal(cpu_state, torch.get_rng_state())  # generators restored afterwards
    assert torch.equal(cuda_state, torch.cuda.get_rng_state())
