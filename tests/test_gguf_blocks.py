"""A GGUF file run as stored (lowbit.models.gguf_blocks): its block-format weights kept as the file's bytes.

The default model's own file (Q4_1 blocks, a Q8_0 embedding tied to the head) and a two-block file lowbit writes
with every kind of block: the 32-weight types, k-quants on the 1536-input down_proj, and attn_q / attn_k in a
block type, whose rows llama.cpp keeps in its rotary order.
"""

import copy

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.export.gguf import write_gguf
from lowbit.formats import GGUFSpec
from lowbit.models.gguf_blocks import keep_blocks, rotary_rows
from lowbit.models.sources import default_model_path
from lowbit.nn import QuantEmbedding, QuantLinear

from conftest import truncated

gguf = pytest.importorskip("gguf")

# module in block 0 / 1 -> the GGUF type it is written in (down_proj reads 1536 inputs: a k-quant fits)
TYPES = {"self_attn.q_proj": "Q5_0", "self_attn.k_proj": "Q4_1", "self_attn.v_proj": "Q8_0",
         "self_attn.o_proj": "Q5_1", "mlp.gate_proj": "Q4_0", "mlp.up_proj": "Q8_0", "mlp.down_proj": "Q4_K"}


@pytest.fixture(scope="module")
def blocks():
    return lowbit.load_model("default", gguf="blocks", kernel="reference")


@pytest.fixture(scope="module")
def mixed(base, tmp_path_factory):
    """A two-block lowbit model with every module in a block type (block 1: down_proj Q6_K, the rest as
    block 0), the embedding Q8_0 and the head tied to it, and the GGUF file written from it."""
    m = truncated(base, 2)
    for i in range(2):
        for rel, t in TYPES.items():
            t = "Q6_K" if (i, rel) == (1, "mlp.down_proj") else t
            w = m.get_submodule(f"model.layers.{i}.{rel}").weight.detach()
            lowbit.nn.set_submodule(m, f"model.layers.{i}.{rel}", QuantLinear(GGUFSpec(t).quantize(w), kernel="reference"))
    emb = GGUFSpec("Q8_0").quantize(m.model.embed_tokens.weight.detach())
    m.model.embed_tokens = QuantEmbedding(emb, None, torch.float32)
    m.lm_head = QuantLinear(emb, kernel="reference")
    path = write_gguf(m, tmp_path_factory.mktemp("mixed") / "m.gguf", source=default_model_path())
    return m, path


def _quantized(model):
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, (QuantLinear, QuantEmbedding))}


def test_default_file_as_stored(blocks, base, eval_ids):
    """Every weight of the default model's file is kept: decoder Linears Q4_1, the embedding Q8_0 and the
    tied head over the embedding's very tensors; each decodes to the float model's weight exactly, and so the
    logits (reference kernel) are the float model's bit for bit."""
    m = blocks.model
    assert m.lowbit["kept_float"] == {}
    q = _quantized(m)
    assert len(q) == 212 and set(m.lowbit["gguf_types"]) == set(q)
    assert {mod.spec.type for n, mod in q.items() if ".layers." in n} == {"Q4_1"}
    assert m.lowbit["gguf_types"]["model.embed_tokens"] == "Q8_0"
    assert m.lm_head.quantized_tensor().same_as(m.model.embed_tokens.quantized_tensor())
    floats = dict(base.named_modules())
    for name, mod in q.items():
        assert torch.equal(mod.dequantized_weight(), floats[name].weight), name
    with torch.no_grad():
        assert torch.equal(m(eval_ids[:1, :64]).logits, base(eval_ids[:1, :64]).logits)


def test_resident_bytes_are_the_files(blocks):
    """On the reference kernel, a module holds exactly its tensor's bytes in the file."""
    reader = gguf.GGUFReader(str(default_model_path()))
    stored = {t.name: int(t.n_bytes) for t in reader.tensors}
    m = blocks.model
    for i in (0, 29):
        assert m.model.layers[i].mlp.down_proj.resident_bytes == stored[f"blk.{i}.ffn_down.weight"]
    assert m.model.embed_tokens.resident_bytes == stored["token_embd.weight"]


def test_written_back_byte_for_byte(blocks, tmp_path):
    out = write_gguf(blocks, tmp_path / "again.gguf", source=default_model_path())
    src = {t.name: t for t in gguf.GGUFReader(str(default_model_path())).tensors}
    again = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    assert set(again) == set(src)
    for name, t in again.items():
        assert t.tensor_type == src[name].tensor_type and t.data.tobytes() == src[name].data.tobytes(), name


def test_every_block_kind_round_trips(mixed, eval_ids):
    """lowbit model -> GGUF file -> blocks: the same bytes in every module (attn_q / attn_k permuted to
    llama.cpp's rotary order on writing and back on loading), and the same logits as the model written and as
    transformers' float load of the file."""
    m, path = mixed
    loaded = lowbit.load_model(path, gguf="blocks", kernel="reference")
    got, want = _quantized(loaded.model), _quantized(m)
    assert set(got) == set(want) and loaded.model.lowbit["kept_float"] == {}
    for name, mod in want.items():
        assert got[name].quantized_tensor().same_as(mod.quantized_tensor()), name
    assert loaded.model.lowbit["gguf_types"]["model.layers.1.mlp.down_proj"] == "Q6_K"
    ids = eval_ids[:1, :48]
    with torch.no_grad():
        out = loaded.model(ids).logits
        assert torch.equal(out, m(ids).logits)
        assert torch.equal(out, lowbit.load_model(path).model(ids).logits)


def test_native_kernels_run_the_blocks(mixed, eval_ids):
    """With the default kernels every block type lands on a kernel of its own format, and greedy decoding
    follows the reference kernel's."""
    _, path = mixed
    loaded = lowbit.load_model(path, gguf="blocks")
    ref = lowbit.load_model(path, gguf="blocks", kernel="reference")
    kernels = {mod.kernel.name for mod in loaded.model.modules() if isinstance(mod, QuantLinear)}
    assert "reference" not in kernels or not lowbit.kernels.native.available()
    ids = eval_ids[:1, :24]
    with torch.no_grad():
        a, b = loaded.model(ids).logits, ref.model(ids).logits
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.999


def test_rotary_rows_inverse_is_transformers_order():
    """argsort(rotary_rows) is the order transformers takes a llama GGUF's q/k rows back to (its per-head
    reshape to [.., half, 2] and swap)."""
    n, heads = 24, 3
    theirs = torch.arange(n).reshape(heads, n // heads // 2, 2).transpose(1, 2).reshape(-1)
    assert torch.equal(torch.argsort(rotary_rows(n, heads)), theirs)


def test_what_cannot_be_kept_stays_float(mixed, eval_ids):
    """A weight whose blocks do not decode to the float model's (here: the float weight nudged, as an
    architecture's unmodelled transform would) stays float and is listed; the others are kept."""
    _, path = mixed
    loaded = lowbit.load_model(path)
    w = loaded.model.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():
        w[5, 7] += 1e-3
    keep_blocks(loaded, path, kernel="reference")
    kept = loaded.model.lowbit["kept_float"]
    assert list(kept) == ["model.layers.0.self_attn.q_proj"] and "do not decode" in kept[
        "model.layers.0.self_attn.q_proj"]
    assert type(loaded.model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert isinstance(loaded.model.model.layers[0].self_attn.k_proj, QuantLinear)


def test_float_weights_stay_float(base, tmp_path):
    """A float tensor in the file (F16 here) stays a float weight, named with its type; a file with no
    block-format weight at all is refused in one line."""
    m = truncated(base, 1)
    w = m.model.layers[0].mlp.up_proj.weight.detach()
    m.model.layers[0].mlp.up_proj = QuantLinear(GGUFSpec("Q8_0").quantize(w), kernel="reference")
    path = write_gguf(m, tmp_path / "one.gguf", source=default_model_path())
    loaded = lowbit.load_model(path, gguf="blocks")
    kept = loaded.model.lowbit["kept_float"]
    assert kept["model.layers.0.mlp.down_proj"] == "F16 (a float type)"
    assert kept["model.embed_tokens"] == "F16 (a float type)"
    assert list(loaded.model.lowbit["gguf_types"]) == ["model.layers.0.mlp.up_proj"]
    plain = write_gguf(truncated(base, 1), tmp_path / "float.gguf", source=default_model_path())
    with pytest.raises(LowbitError, match="stores no weight in a block type"):
        lowbit.load_model(plain, gguf="blocks")
    with pytest.raises(LowbitError, match="gguf must be float or blocks"):
        lowbit.load_model(plain, gguf="packed")


def test_generate_runs_the_blocks(mixed, capsys):
    """`lowbit generate FILE.gguf` keeps the blocks by default; on the reference kernel its text is that of the
    float load (--gguf float)."""
    _, path = mixed
    args = ["generate", str(path), "--prompt", "Python is", "--max-new-tokens", "5", "--engine", "eager",
            "--kernel", "reference"]
    assert main(args) == 0
    as_blocks = capsys.readouterr().out
    assert main(args + ["--gguf", "float"]) == 0
    assert capsys.readouterr().out == as_blocks and as_blocks.strip()


def test_a_blocks_load_parses_the_file_once(mixed, monkeypatch):
    """Loading a GGUF file with its blocks kept parses it once: the check, transformers' three requests and
    keep_blocks' share one reader."""
    from lowbit.io import gguf_reader
    _, path = mixed
    built, init = [], gguf_reader.GGUFReader.__init__

    def counting_init(self, *a, **kw):
        built.append(a[0])
        init(self, *a, **kw)
    monkeypatch.setattr(gguf_reader.GGUFReader, "__init__", counting_init)
    lowbit.load_model(path, gguf="blocks", cache=False, kernel="reference")
    assert built == [str(path)]
