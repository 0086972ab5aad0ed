"""Megatron-Core's BERT and T5 (written by megatron-core at tensor-parallel size 1, as torch_dist
and as Megatron-LM `torch` files; tests/megatron_bert_oracle.py) load into our BertModel / T5Model
at tensor-parallel size 2 (two gloo ranks): the vocabulary-parallel logits of the two ranks, put
together, are Megatron-Core's own (1e-5, fp32)."""

import pytest
import torch

from tests import megatron_bert_oracle as oracle
from tests import megatron_oracle
from tests.parallel.harness import free_port, run_distributed
from tests.unit._bert_t5_fixtures import check_outputs, our_config

pytestmark = [pytest.mark.skipif(not megatron_oracle.megatron_available(), reason="megatron-core is not installed"),
              pytest.mark.usefixtures("one_thread")]


def _tp2_outputs(rank, world_size, root, kind):
    from gigatron.core.models.bert import BertModel
    from gigatron.core.models.t5 import T5Model
    from gigatron.core.parallel.config import ParallelConfig
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.training.checkpointing import load_checkpoint
    from tests.unit._bert_t5_fixtures import our_outputs

    groups = ParallelGroups.build(ParallelConfig(tensor_model_parallel_size=2))
    config = our_config(tensor_model_parallel_size=2)
    if kind == "bert":
        model = BertModel(config, groups, oracle.VOCAB, num_tokentypes=2, add_binary_head=True, seed=5)
    else:
        model = T5Model(config, groups, oracle.VOCAB, seed=5, position_embedding_type="learned_absolute")
    loaded = load_checkpoint(root, [model], None, None, groups, load_optim=False)
    ref = torch.load(f"{root}/reference.pt", weights_only=True)
    logits, binary = our_outputs(kind, model.eval(), ref)  # this rank's vocabulary half
    return loaded.iteration, logits, binary


@pytest.mark.parametrize("layout", ["write-dist", "write-torch"])
@pytest.mark.parametrize("kind", ["bert", "t5"])
def test_megatron_bert_t5_read_at_tp2(tmp_path, kind, layout):
    oracle.run_oracle(layout, "--kind", kind, "--root", str(tmp_path), port=free_port())
    if layout == "write-dist":  # the reference: Megatron-Core's own load of its torch_dist
        oracle.run_oracle("logits", "--kind", kind, "--root", str(tmp_path), port=free_port())
    ref = torch.load(tmp_path / "reference.pt", weights_only=True)
    results = run_distributed(_tp2_outputs, 2, str(tmp_path), kind, timeout=300)
    assert all(iteration == 5 for iteration, _, _ in results)
    logits = torch.cat([r[1] for r in results], dim=-1)
    check_outputs(kind, ref, logits, results[0][2])
