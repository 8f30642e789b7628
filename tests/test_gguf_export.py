"""GGUF export (lowbit.export.gguf) and the quantized embedding (lowbit.nn.qembedding).

The reference model here is the default model's own GGUF file turned into a lowbit model without any
quantizing: every Linear and the embedding hold the file's block bytes (Q4_1, Q8_0), attn_q / attn_k rows taken
back from llama.cpp's rotary order, the head tied to the embedding. Writing it must give back the source file's
tensors byte for byte, and its metadata but for what must change.
"""

import copy
import math
import os

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.size import weight_stats
from lowbit.export.checkpoint import load_checkpoint, save_checkpoint
from lowbit.export.gguf import gguf_file_bytes, write_gguf
from lowbit.formats import GGUFSpec, IntSpec, QuantizedTensor
from lowbit.formats.fp8 import FloatSpec
from lowbit.models.sources import default_model_path
from lowbit.nn import QuantEmbedding, QuantLinear, set_submodule

from conftest import truncated

gguf = pytest.importorskip("gguf")

HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def source():
    reader = gguf.GGUFReader(str(default_model_path()))
    return {t.name: t for t in reader.tensors}, reader


def _from_file(t, spec_type, n_heads=None) -> QuantizedTensor:
    """A GGUF tensor's bytes as a lowbit QuantizedTensor; for attn_q/attn_k the rows in transformers' order
    (inverse of llama.cpp's per-head interleave of the two rotary halves)."""
    q = torch.from_numpy(t.data.copy())
    if n_heads is not None:
        n = q.shape[0]
        order = torch.arange(n).reshape(n_heads, n // n_heads // 2, 2).transpose(1, 2).reshape(-1)
        q = q[order]
    return QuantizedTensor(GGUFSpec(spec_type), (int(t.shape[1]), int(t.shape[0])), q.contiguous())


def _source_model(base, tensors, n_blocks):
    """The default model's GGUF as a lowbit model of its first n_blocks blocks, no value changed."""
    m = truncated(base, n_blocks)
    cfg = m.config
    for i in range(n_blocks):
        for hf, g in HF_TO_GGUF.items():
            t = tensors[f"blk.{i}.{g}.weight"]
            heads = {"attn_q": cfg.num_attention_heads, "attn_k": cfg.num_key_value_heads}.get(g)
            set_submodule(m, f"model.layers.{i}.{hf}", QuantLinear(_from_file(t, t.tensor_type.name, heads)))
    emb = _from_file(tensors["token_embd.weight"], "Q8_0")
    m.model.embed_tokens = QuantEmbedding(emb, None, torch.float32)
    m.lm_head = QuantLinear(emb)   # tied: the very same tensors
    return m


@pytest.fixture(scope="module")
def two_blocks(base, source):
    return _source_model(base, source[0], 2)


def _read(path):
    r = gguf.GGUFReader(str(path))
    return r, {t.name: t for t in r.tensors}


def test_source_rows_match_transformers(base, two_blocks):
    """The test's own un-permutation agrees with transformers' loading of the same file: the reference model's
    dequantized weights are the float model's, exactly."""
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        ours = two_blocks.get_submodule(f"model.layers.1.{name}").dequantized_weight()
        assert torch.equal(ours, base.get_submodule(f"model.layers.1.{name}").weight)
    assert torch.equal(two_blocks.model.embed_tokens.dequantized_weight(), base.model.embed_tokens.weight)


def test_writes_source_bytes_back(two_blocks, source, tmp_path):
    tensors, src = source
    out = write_gguf(two_blocks, tmp_path / "m.gguf", source=default_model_path())
    assert os.path.getsize(out) == gguf_file_bytes(two_blocks, default_model_path())
    r, written = _read(out)
    expect = {n for n in tensors if not n.startswith("blk.") or n.split(".")[1] in ("0", "1")}
    assert set(written) == expect            # tied head: no `output` tensor, as in the source
    for name, t in written.items():
        s = tensors[name]
        assert t.tensor_type == s.tensor_type and list(t.shape) == list(s.shape), name
        assert t.data.tobytes() == s.data.tobytes(), name
    changed = {"general.file_type", "llama.block_count", "GGUF.tensor_count"}
    assert list(r.fields) == list(src.fields)
    for key, f in src.fields.items():
        if key not in changed:
            assert f.contents() == r.fields[key].contents(), key
    assert r.fields["llama.block_count"].contents() == 2
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_1


def test_types_and_size_prediction(two_blocks, base, tmp_path):
    """Mixed types, untied head; the predicted size of other types equals the file once they are written."""
    m = copy.deepcopy(two_blocks)
    down = base.model.layers[0].mlp.down_proj.weight.detach()
    m.model.layers[0].mlp.down_proj = QuantLinear(GGUFSpec("Q4_K").quantize(down))
    m.model.embed_tokens = copy.deepcopy(base.model.embed_tokens)   # float embedding, head stays Q8_0: untied
    src = default_model_path()
    out = write_gguf(m, tmp_path / "a.gguf", source=src)
    _, t = _read(out)
    assert t["token_embd.weight"].tensor_type.name == "F16" and t["output.weight"].tensor_type.name == "Q8_0"
    assert t["blk.0.ffn_down.weight"].tensor_type.name == "Q4_K"
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert t["blk.0.ffn_down.weight"].data.tobytes() == m.model.layers[0].mlp.down_proj.quantized_tensor().qweight.numpy().tobytes()
    assert torch.equal(torch.from_numpy(t["token_embd.weight"].data.copy()), base.model.embed_tokens.weight.half())
    assert os.path.getsize(out) == gguf_file_bytes(m, src)

    types = {"model.layers.0.mlp.down_proj": "Q6_K", "blk.1.attn_v": "Q8_0"}
    predicted = gguf_file_bytes(m, src, types)
    m.model.layers[0].mlp.down_proj = QuantLinear(GGUFSpec("Q6_K").quantize(down))
    v = base.model.layers[1].self_attn.v_proj.weight.detach()
    m.model.layers[1].self_attn.v_proj = QuantLinear(GGUFSpec("Q8_0").quantize(v))
    out = write_gguf(m, tmp_path / "b.gguf", source=src)
    assert os.path.getsize(out) == predicted != os.path.getsize(tmp_path / "a.gguf")
    with pytest.raises(LowbitError, match="model.layers.0.self_attn.q_proj.*not a multiple of Q4_K"):
        gguf_file_bytes(m, src, {"model.layers.0.self_attn.q_proj": "Q4_K"})
    with pytest.raises(LowbitError, match="does not have"):
        gguf_file_bytes(m, src, {"model.layers.7.mlp.up_proj": "Q8_0"})


@pytest.mark.parametrize("spec, suggest", [(IntSpec(4, 64, False), "Q4_0"), (FloatSpec("e4m3"), "Q8_0"),
                                           (IntSpec(8, -1, True), "Q8_0")])
def test_unexpressible_format(two_blocks, base, tmp_path, spec, suggest):
    m = copy.deepcopy(two_blocks)
    m.model.layers[1].mlp.up_proj = QuantLinear(spec.quantize(base.model.layers[1].mlp.up_proj.weight.detach()))
    with pytest.raises(LowbitError, match=f"model.layers.1.mlp.up_proj is stored as {spec.name}.*{suggest}"):
        write_gguf(m, tmp_path / "x.gguf", source=default_model_path())
    assert list(tmp_path.iterdir()) == []


def test_bad_outputs(two_blocks, tmp_path):
    src = default_model_path()
    existing = tmp_path / "e.gguf"
    existing.write_bytes(b"old")
    with pytest.raises(LowbitError, match="already exists"):
        write_gguf(two_blocks, existing, source=src)
    assert existing.read_bytes() == b"old"
    with pytest.raises(LowbitError, match="not a writable directory"):
        write_gguf(two_blocks, existing / "x.gguf", source=src)
    with pytest.raises(LowbitError, match="needs source="):
        write_gguf(two_blocks, tmp_path / "y.gguf")
    other = copy.deepcopy(two_blocks)
    other.config.num_key_value_heads = 9
    with pytest.raises(LowbitError, match="describes another model: llama.attention.head_count_kv"):
        write_gguf(other, tmp_path / "z.gguf", source=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.gguf"]
    write_gguf(two_blocks, existing, source=src, overwrite=True)
    assert existing.read_bytes()[:4] == b"GGUF" and existing.stat().st_size == gguf_file_bytes(two_blocks, src)


# --------------------------------------------------------------------------------------------------------------
# quantized embedding

def test_quant_embedding_gathers_rows(base):
    w = base.model.embed_tokens.weight.detach()[:1000]
    for spec in (GGUFSpec("Q5_0"), GGUFSpec("Q8_0"), IntSpec(4, 64, False), FloatSpec("e4m3")):
        qt = spec.quantize(w)
        emb = QuantEmbedding(qt).to(torch.bfloat16)
        ids = torch.tensor([[3, 999, 3, 0], [17, 5, 500, 2]])
        out = emb(ids)
        assert out.dtype == torch.bfloat16 and out.shape == (2, 4, 576)
        assert torch.equal(out, qt.dequantize()[ids].to(torch.bfloat16))
        assert emb.qweight.dtype == qt.qweight.dtype


def test_embedding_recipe_tied_and_untied(tiny_dir, tmp_path):
    """A rule can quantize the embedding; the same format for a tied head keeps one tensor (stored once),
    different formats untie; checkpoints reload to identical logits; the engine runs it."""
    from lowbit.engine.decoder import Decoder
    tiny = lowbit.load_model(tiny_dir)
    ids = torch.tensor([[1, 2, 3, 400, 5000, 7]])
    rules = {"tied": [{"match": "model.embed_tokens", "bits": 8, "group_size": 64},
                      {"match": "lm_head", "bits": 8, "group_size": 64}],
             "untied": [{"match": "model.embed_tokens", "bits": 8, "group_size": 64},
                        {"match": "lm_head", "bits": 4, "group_size": 32}]}
    for case, rule in rules.items():
        m = lowbit.quantize(copy.deepcopy(tiny.model), lowbit.Recipe.from_rules(rule, lowbit.RTN(group_size=32)),
                            progress=False, dtype=torch.float32)
        emb, head = m.model.embed_tokens, m.lm_head
        assert isinstance(emb, QuantEmbedding) and isinstance(head, QuantLinear)
        shared = head.quantized_tensor().same_as(emb.quantized_tensor())
        assert shared == (case == "tied") == m.config.tie_word_embeddings
        with torch.no_grad():
            logits = m(ids).logits
        ck = save_checkpoint(m, tiny.tokenizer, tmp_path / case)
        tables = emb.quantized_tensor().nbytes + (0 if shared else head.quantized_tensor().nbytes)
        blocks = sum(q.quantized_tensor().nbytes for q in m.model.layers.modules() if isinstance(q, QuantLinear))
        assert tables + blocks < os.path.getsize(ck / "model.safetensors") < tables + blocks + 20000
        stats = weight_stats(m)   # the tied table counted once, as stored
        assert tables + blocks < stats["bytes"] < os.path.getsize(ck / "model.safetensors")
        back = load_checkpoint(ck)
        with torch.no_grad():
            assert torch.equal(back.model(ids).logits, logits), case
        assert isinstance(back.model.model.embed_tokens, QuantEmbedding)
        with torch.no_grad():
            dec = Decoder(back.model, 16)(ids, torch.arange(ids.shape[1]), all_logits=True)
        assert (dec - logits).abs().max() < 1e-4


def test_hf_directory_metadata(tiny_dir, source, tmp_path):
    """From a Hugging Face directory: llama.cpp's keys from config.json, the tokenizer as llama.cpp's gpt2
    model (the tiny model has the default model's tokenizer, so its tokens and types equal the default GGUF's)."""
    tiny = lowbit.load_model(tiny_dir)
    out = write_gguf(tiny, tmp_path / "t.gguf")          # source: the directory it was loaded from
    assert os.path.getsize(out) == gguf_file_bytes(tiny)
    r, t = _read(out)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.") or "token_id" in k}
    assert f["general.architecture"] == "llama" and f["llama.block_count"] == 2
    assert (f["llama.embedding_length"], f["llama.feed_forward_length"]) == (64, 128)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.rope.dimension_count"] == 16 and f["llama.context_length"] == 512
    src = source[1].fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert r.fields[key].contents() == src[key].contents(), key
    assert "output.weight" not in t and t["token_embd.weight"].tensor_type.name == "F16"
    assert t["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    q = tiny.model.model.layers[0].self_attn.q_proj.weight.detach()
    rows = torch.arange(64).reshape(4, 2, 8).transpose(1, 2).reshape(-1)
    assert torch.equal(torch.from_numpy(t["blk.0.attn_q.weight"].data.copy()), q[rows].half())


def test_default_recipe_keeps_embedding(tiny_dir):
    m = lowbit.quantize(lowbit.load_model(tiny_dir).model, lowbit.RTN(group_size=32), progress=False)
    assert isinstance(m.model.embed_tokens, torch.nn.Embedding) and isinstance(m.lm_head, torch.nn.Linear)


# --------------------------------------------------------------------------------------------------------------
# the written file in other readers (transformers through lowbit.load, llama.cpp)

@pytest.mark.slow
def test_reload_through_lowbit_gives_same_logits(two_blocks, base, tmp_path, monkeypatch, eval_ids):
    """transformers dequantizes the file with gguf's reference codecs, lowbit with its own bit-exact ones and
    the same float32 matmuls: the logits are equal bit for bit (float32 everywhere)."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    m = copy.deepcopy(two_blocks)
    down = base.model.layers[1].mlp.down_proj.weight.detach()
    m.model.layers[1].mlp.down_proj = QuantLinear(GGUFSpec("Q3_K").quantize(down))
    out = write_gguf(m, tmp_path / "m.gguf", source=default_model_path())
    back = lowbit.load_model(out)
    assert back.model.config.num_hidden_layers == 2 and back.model.config.tie_word_embeddings
    ids = eval_ids[:1, :128]
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, m(ids).logits)


@pytest.mark.slow
def test_llama_cpp_runs_the_file(base, source, tmp_path, eval_ids):
    """The whole default model re-exported by lowbit: llama.cpp's logits on a real text window agree with
    lowbit's (llama.cpp multiplies with activations rounded to 8 bits, so not bit for bit)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    m = _source_model(base, source[0], base.config.num_hidden_layers)
    out = write_gguf(m, tmp_path / "full.gguf", source=default_model_path())
    ids = eval_ids[0, :256]
    llm = llama_cpp.Llama(str(out), n_ctx=512, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ours = m(ids[None]).logits[0].float()
    kld = torch.nn.functional.kl_div(theirs.log_softmax(-1), ours.log_softmax(-1), log_target=True,
                                     reduction="none").sum(-1).mean().item()
    print(f"llama.cpp vs lowbit on {len(ids)} tokens: KLD {kld:.3g}, max |dlogit| "
          f"{(theirs - ours).abs().max().item():.3g}")
    assert kld < 1e-2 and math.isfinite(kld)


def test_a_gguf_file_loads_with_one_parse_and_the_same_result(two_blocks, tmp_path, monkeypatch):
    """gguf-py's reader is built once per load (transformers asks for it three times) and the model and
    tokenizer are those of a load that builds it every time; gguf-py's own names are restored afterwards."""
    import contextlib

    from lowbit.io import gguf_reader
    from lowbit.models import sources
    path = write_gguf(two_blocks, tmp_path / "m.gguf", source=default_model_path())
    built = []
    real, init = gguf.GGUFReader, gguf_reader.GGUFReader.__init__

    def counting(*a, **kw):   # gguf-py's own reader, as transformers calls it
        built.append("gguf")
        return real(*a, **kw)

    def counting_init(self, *a, **kw):   # lowbit's
        built.append("lowbit")
        init(self, *a, **kw)
    monkeypatch.setattr(gguf, "GGUFReader", counting)
    monkeypatch.setattr(gguf_reader.GGUFReader, "__init__", counting_init)
    once = lowbit.load_model(path, cache=False)
    assert built == ["lowbit"] and gguf.GGUFReader is counting
    monkeypatch.setattr(sources, "_gguf_parsed_once", contextlib.nullcontext)
    every = lowbit.load_model(path, cache=False)
    assert len(built) > 2
    a, b = once.model.state_dict(), every.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert once.model.config.to_dict() == every.model.config.to_dict()
    text = "def f(x):\n    return x ** 2  # squares"
    assert once.tokenizer(text)["input_ids"] == every.tokenizer(text)["input_ids"]
