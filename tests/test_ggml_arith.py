"""llama.cpp's CPU arithmetic in lowbit (lowbit.eval.ggml_arith): activation rounding per vec_dot type, by hand
on blocks whose results are known, and end to end against llama.cpp's own logits on a GGUF file lowbit wrote."""

import copy

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import LowbitError
from lowbit.eval.ggml_arith import VEC_DOT_TYPE, ggml_arithmetic, quantize_activations
from lowbit.export.gguf import write_gguf
from lowbit.formats import GGUF_TYPES, IntSpec
from lowbit.models.sources import default_model_path
from lowbit.nn import QuantLinear

from conftest import truncated

MIX = [{"match": "model.embed_tokens", "gguf_type": "Q8_0"}, {"match": "lm_head", "gguf_type": "Q8_0"},
       {"match": "*.mlp.down_proj", "gguf_type": "Q4_K"}, {"match": "*.self_attn.*", "gguf_type": "Q4_0"},
       {"match": "model.layers.*", "gguf_type": "Q5_0"}]


def test_every_gguf_type_has_its_vec_dot_type():
    assert set(GGUF_TYPES) <= set(VEC_DOT_TYPE)
    assert {VEC_DOT_TYPE[t] for t in ("Q4_0", "Q5_0", "Q8_0")} == {"Q8_0"}
    assert {VEC_DOT_TYPE[t] for t in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")} == {"Q8_K"}


def test_q8_0_blocks():
    # amax 127: scale exactly 1, so the codes are the rounded inputs, ties to even (2.5 -> 2, 3.5 -> 4)
    x = torch.zeros(2, 64)
    x[0, :5] = torch.tensor([127.0, 2.5, 3.5, -2.5, 0.4])
    x[0, 32:34] = torch.tensor([-1.0, 0.3])     # second block: amax 1, step f16(1/127)
    out = quantize_activations(x, "Q8_0")
    assert out[0, :5].tolist() == [127.0, 2.0, 4.0, -2.0, 0.0]
    d = torch.tensor(1 / 127).half().float()
    assert out[0, 32].item() == -127 * d.item() and out[0, 33].item() == round(0.3 * 127) * d.item()
    assert torch.equal(out[1], torch.zeros(64))   # an all-zero block stays zero
    r = torch.randn(8, 96) * 3
    codes = quantize_activations(r, "Q8_0").reshape(8, 3, 32) / (r.reshape(8, 3, 32).abs().amax(-1, keepdim=True)
                                                                  / 127).half().float()
    assert torch.equal(codes, codes.round()) and codes.abs().max() == 127


def test_q8_k_blocks():
    # amax 254 over a block of 256: iscale 0.5, d = 1 / 0.5 = 2 in float32 (not f16)
    x = torch.zeros(1, 512)
    x[0, :4] = torch.tensor([254.0, 1.0, 3.0, -5.0])
    x[0, 256] = 1e-3                              # second block: step 1e-3 / 127 kept in float32
    out = quantize_activations(x, "Q8_K")
    assert out[0, :4].tolist() == [254.0, 0.0, 4.0, -4.0]
    assert out[0, 256].item() == torch.tensor(127.0) * (1 / (torch.tensor(127.0) / torch.tensor(1e-3)))
    with pytest.raises(LowbitError, match="multiple of 256"):
        quantize_activations(torch.randn(1, 576), "Q8_K")


@pytest.mark.parametrize("vdt,block,size,d_at,d_type,qs_at", [("Q8_0", 32, 34, 0, "float16", 2),
                                                                ("Q8_1", 32, 36, 0, "float16", 4),
                                                                ("Q8_K", 256, 292, 0, "float32", 4)])
def test_matches_ggml_row_quantizers(vdt, block, size, d_at, d_type, qs_at):
    """Bit for bit against the quantize_row_* functions of the ggml-cpu library llama-cpp-python ships."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    import os
    import numpy as np
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-cpu.so"))
    fn = getattr(lib, f"quantize_row_{vdt.lower()[:-1]}{vdt[-1]}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    torch.manual_seed(0)
    x = (torch.randn(32, 1536) * torch.rand(32, 1) * 5).numpy()
    x[3, :256] = 0
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    blocks = out.reshape(-1, size)
    width = 2 if d_type == "float16" else 4
    d = blocks[:, d_at:d_at + width].copy().view(d_type).astype(np.float32)
    ref = (blocks[:, qs_at:qs_at + block].view(np.int8).astype(np.float32) * d).reshape(x.shape)
    assert np.array_equal(quantize_activations(torch.from_numpy(x), vdt).numpy(), ref)


def test_float_types():
    x = torch.randn(3, 64)
    assert torch.equal(quantize_activations(x, "F32"), x)
    assert torch.equal(quantize_activations(x, "F16"), x.half().float())
    with pytest.raises(LowbitError, match="unknown vec_dot"):
        quantize_activations(x, "Q9_9")



def as_float32(model):
    """The model in float32. nn.Module's own cast: transformers refuses .float() on a model it loaded from a
    quantized GGUF file, although the weights it holds are plain float tensors."""
    return nn.Module.float(model)

@pytest.fixture(scope="module")
def mixed(base):
    return lowbit.quantize(as_float32(truncated(base, 2)), lowbit.Recipe.from_rules(MIX, lowbit.RTN()),
                           dtype=torch.float32, progress=False)


def test_context_restores_the_model(mixed, eval_ids):
    ids = eval_ids[:1, :64]
    with torch.no_grad():
        before = mixed(ids).logits
        with ggml_arithmetic(mixed):
            inside = mixed(ids).logits
        after = mixed(ids).logits
    assert torch.equal(before, after) and not torch.equal(before, inside)
    # outside, the GGUF layers run lowbit's native kernels (bfloat16 matmuls for many rows where the CPU has
    # them): close to llama.cpp's arithmetic, not equal
    assert (inside - before).abs().max() < 0.05 * before.abs().max()


def test_refuses_what_gguf_cannot_store(base):
    m = as_float32(truncated(base, 1))
    m.model.layers[0].mlp.up_proj = QuantLinear(IntSpec(4, 64, True).quantize(m.model.layers[0].mlp.up_proj.weight))
    before = m.lm_head.weight.detach().clone()
    with pytest.raises(LowbitError, match="GGUF has no type"):
        with ggml_arithmetic(m):
            pass
    assert torch.equal(m.lm_head.weight, before) and not m.model.layers[0].mlp.down_proj._forward_pre_hooks
    with pytest.raises(LowbitError, match="float32"):
        with ggml_arithmetic(nn.Module.bfloat16(m)):
            pass


def test_agrees_with_llama_cpp(base, mixed, eval_ids, tmp_path):
    """The file lowbit wrote (Q4_0 attention, Q5_0 gate/up, Q4_K down, Q8_0 embedding and head), run by
    llama.cpp: its KL divergence from the float model is what lowbit measures with llama.cpp's arithmetic, not
    what lowbit's float32 path measures (which misses the activation rounding). Logits are not equal bit for
    bit: float32 sums in another order move some activations across a rounding boundary."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import numpy as np
    path = write_gguf(mixed, tmp_path / "mix.gguf", source=default_model_path())
    ids = eval_ids[0, :256]
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2, n_batch=256)
    llm.eval(ids.tolist())
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    with torch.no_grad():
        ref = as_float32(truncated(base, 2))(ids[None]).logits[0].log_softmax(-1)
        plain = mixed(ids[None]).logits[0]
        with ggml_arithmetic(mixed):
            emulated = mixed(ids[None]).logits[0]
    kld = {k: (ref.exp() * (ref - v.log_softmax(-1))).sum(-1).mean().item()
           for k, v in (("llama.cpp", theirs), ("float32", plain), ("emulated", emulated))}
    print(kld)
    off = {k: abs(kld[k] / kld["llama.cpp"] - 1) for k in ("float32", "emulated")}
    assert off["emulated"] < 0.04 and off["float32"] > 2 * off["emulated"]


def test_evaluate_option(base, mixed, tokenizer):
    ref = as_float32(truncated(base, 2))
    kw = dict(tokenizer=tokenizer, base=ref, max_windows=1, ctx=128, speed=False, progress=False)
    plain = lowbit.evaluate(mixed, **kw)
    half = nn.Module.bfloat16(copy.deepcopy(mixed))
    ours = lowbit.evaluate(half, arithmetic="llama.cpp", **kw)
    assert ours["arithmetic"] == "llama.cpp" and ours["kld"] != plain["kld"]
    assert half.model.norm.weight.dtype == torch.bfloat16   # given back in its own dtype
    with pytest.raises(LowbitError, match="arithmetic must be"):
        lowbit.evaluate(mixed, arithmetic="ggml", **kw)
