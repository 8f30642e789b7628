"""The generation engine: same tokens and logits as transformers' own generate, eager and compiled."""

import pytest
import torch
from transformers import GenerationConfig

from lowbit import LowbitError, load_model
from lowbit.engine import Engine
from lowbit.nn import QuantLinear
from lowbit.nn.fuse import fuse_linears

from conftest import quantized, truncated

PROMPT = "The history of the Python language"


def reference_tokens(model, ids, n):
    """transformers' generate, greedy, never stopping early: the reference path. The attention mask is given:
    inferred, it would hide every prompt token equal to the pad id (random prompts contain them)."""
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    # transformers fills a passed config's unset fields from the model's own, whose eos id would stop it early
    own, model.generation_config.eos_token_id = model.generation_config.eos_token_id, None
    try:
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc)[0, ids.shape[1]:]
    finally:
        model.generation_config.eos_token_id = own


def reference_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits[:, -1]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt")["input_ids"]


# --- the default model: 64 greedy tokens identical to the reference, fp32, INT8 and INT4 -------------------
# (bit-equal tests ask for the reference's attention and matmuls: by default a decoded token's attention and its
# 16-bit Linears run on lowbit's kernels, whose float32 arithmetic agrees to the model dtype's rounding;
# tests/test_decode_attention.py and tests/test_native_dense.py check those)

@pytest.mark.parametrize("scheme", ["fp32", "int8", "int4"])
def test_default_model_tokens_match_reference(fresh, prompt_ids, scheme):
    model = fresh if scheme == "fp32" else quantized(fresh, bits=8 if scheme == "int8" else 4,
                                                      group_size=-1 if scheme == "int8" else 64)
    want = reference_tokens(model, prompt_ids, 64)
    got = Engine(model, compile=False, attention="reference", dense="reference").generate(prompt_ids, 64)["tokens"]
    assert torch.equal(got, want)


def test_default_engine_on_real_blocks_matches_reference(base, prompt_ids):
    """The engine `lowbit generate` runs by default (the step compiled ahead of time on a CPU) on the default
    model's first two blocks: real weights, shapes and vocabulary, compiled in a fraction of the whole model's
    time (the whole model: the slow test below)."""
    model = quantized(truncated(base, 2), bits=4, group_size=64, symmetric=False)
    engine = Engine(model, attention="reference", dense="reference")
    assert torch.equal(engine.generate(prompt_ids, 64)["tokens"], reference_tokens(model, prompt_ids, 64))
    assert engine.kind == "aot"   # a CPU model with a plain cache


@pytest.mark.slow
@pytest.mark.parametrize("compile", ["auto", True])
def test_default_model_compiled_int4_matches_reference(fresh, prompt_ids, compile):
    model = quantized(fresh, bits=4, group_size=64, symmetric=False)
    want = reference_tokens(model, prompt_ids, 64)
    engine = Engine(model, compile=compile, attention="reference", dense="reference")
    got = engine.generate(prompt_ids, 64)["tokens"]
    assert torch.equal(got, want)


# --- tiny models: logits, compiled vs eager, other families of the table ----------------------------------

def _tiny_model(kind: str, **cfg):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    torch.manual_seed(3)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=512, **cfg)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
    model = AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():   # random init leaves some biases at zero: make every path count
        p.data.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_tiny_families_prefill_and_decode_logits(kind):
    model = _tiny_model(kind)
    ids = torch.randint(0, 256, (1, 9))
    engine = Engine(model, compile=False)
    engine.reserve(16)
    with torch.no_grad():
        torch.testing.assert_close(engine.prefill(ids[:, :8]), reference_logits(model, ids[:, :8]),
                                   rtol=1e-5, atol=1e-5)
        logits, token = engine.decode(ids[:, 8:9], 8)
        torch.testing.assert_close(logits, reference_logits(model, ids), rtol=1e-5, atol=1e-5)
        assert token.item() == logits.argmax().item()
    assert torch.equal(engine.generate(ids, 20)["tokens"], reference_tokens(model, ids, 20))


@pytest.mark.parametrize("bits", [None, pytest.param(8, marks=pytest.mark.slow), 4])   # 8: the path 4 shares
def test_compiled_step_equals_eager(bits):
    model = _tiny_model("llama")
    if bits:
        model = quantized(model, bits=bits, group_size=-1 if bits == 8 else 32)
    ids = torch.randint(0, 256, (1, 5))
    eager, compiled = Engine(model, compile=False), Engine(model, compile=True)
    a, b = eager.generate(ids, 24), compiled.generate(ids, 24)
    assert torch.equal(a["tokens"], b["tokens"])
    for e in (eager, compiled):
        e.reserve(40)
        e.prefill(ids)
    for i in range(3):
        la, ta = eager.decode(ids[:, i:i + 1], 5 + i)
        lb, tb = compiled.decode(ids[:, i:i + 1], 5 + i)
        assert torch.equal(la, lb) and torch.equal(ta, tb)


def test_background_compilation_runs_under_the_callers_compile_settings(monkeypatch):
    # torch's compile settings are per thread; the native kernels' cache tag (kernels.native) is one of them
    model = quantized(_tiny_model("llama"), bits=4, group_size=32)
    engine = Engine(model, compile=True, background=True)
    seen = []
    monkeypatch.setattr(engine, "_compile_in_background", lambda: seen.append(torch.compiler.config.cache_key_tag))
    with torch.compiler.config.patch(cache_key_tag="the-callers-tag"):
        engine.generate(torch.randint(0, 256, (1, 5)), 4)
        engine.wait_compiled()
    assert seen and set(seen) == {"the-callers-tag"}


def test_background_compilation_decodes_eagerly_then_switches_with_the_same_tokens():
    model = quantized(_tiny_model("llama"), bits=4, group_size=32)
    ids = torch.randint(0, 256, (1, 5))
    want = Engine(model, compile=False).generate(ids, 24)["tokens"]
    engine = Engine(model, compile=True, background=True)
    seen, graphs, eager = [], [], []
    from torch._dynamo.utils import counters

    def on_token(tok):
        seen.append(int(tok))
        if len(seen) == 5:        # the first decode steps ran eagerly (all 4 unless a warm cache was faster)
            engine.wait_compiled()
            graphs.append(counters["stats"]["unique_graphs"])
            eager.append(engine.eager_steps)

    r = engine.generate(ids, 24, on_token=on_token)
    assert torch.equal(r["tokens"], want) and seen == want.tolist()
    assert 1 <= eager[0] <= 4 and r["eager_tokens"] == eager[0]     # from the wait on, only the compiled step
    assert r["compiled_tokens_per_s"] > 0 and engine.compile_seconds > 0
    again = engine.generate(ids, 24)
    assert again["eager_tokens"] == 0 and torch.equal(again["tokens"], want)
    assert counters["stats"]["unique_graphs"] == graphs[0]   # the graph compiled in the background serves every step
    longer = torch.randint(0, 256, (1, 300))       # a new bucket compiles in the background again
    r = engine.generate(longer, 8)
    engine.wait_compiled()
    assert r["eager_tokens"] >= 1 and torch.equal(r["tokens"], Engine(model, compile=False).generate(longer, 8)["tokens"])


def test_eager_steps_wait_out_a_tracer_that_replaced_module_call(monkeypatch):
    """While the compiler thread traces, torch replaces nn.Module.__call__ process-wide and its tracer rejects
    other modules' calls: the eager step waits until the replacement is gone, and runs again if one started
    during it (it rewrites the same cache positions), with the same logits as undisturbed."""
    import threading
    import time
    from torch import nn
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5))
    engine = Engine(model, compile=False)
    engine.reserve(16)
    want = engine.prefill(ids)
    busy = threading.Event()
    engine._compiler = threading.Thread(target=busy.wait)      # a compilation in flight
    engine._compiler.start()
    original = nn.Module.__call__

    def tracer_call(mod, *args, **kwargs):
        raise NameError("module is not installed as a submodule")
    monkeypatch.setattr(nn.Module, "__call__", tracer_call)
    threading.Timer(0.3, lambda: setattr(nn.Module, "__call__", original)).start()
    t0 = time.perf_counter()
    got = engine.prefill(ids)                                   # waits for the replacement to go
    assert time.perf_counter() - t0 >= 0.25 and torch.equal(got, want)
    calls = []

    def interrupted_once(*args):                                # a tracing started during the step
        calls.append(1)
        if len(calls) == 1:
            raise NameError("module is not installed as a submodule")
        return engine.decoder(*args)
    assert torch.equal(engine._beside_compiler(interrupted_once, ids, engine.decoder.positions[:5]), want)
    assert len(calls) == 2
    busy.set()
    engine.wait_compiled()


def test_a_background_compilation_that_fails_runs_eagerly_or_raises_when_strict(monkeypatch):
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 5))
    want = Engine(model, compile=False).generate(ids, 8)["tokens"]

    def broken(*args):
        raise RuntimeError("no compiler here")

    engine = Engine(model, compile=True, background=True)
    engine._step = broken
    engine.generate(ids, 2)          # its one decode step starts the (failing) compilation and runs eagerly
    engine.wait_compiled()
    with pytest.raises(RuntimeError, match="no compiler here"):     # LOWBIT_STRICT_COMPILE=1 (conftest)
        engine.generate(ids, 8)
    monkeypatch.setenv("LOWBIT_STRICT_COMPILE", "0")    # "0" means off, as an empty value does
    engine = Engine(model, compile=True, background=True)
    engine._step = broken
    engine.generate(ids, 2)
    engine.wait_compiled()
    with pytest.warns(UserWarning, match="compiling the decode step failed .*no compiler here.*running eagerly"):
        r = engine.generate(ids, 8)
    assert torch.equal(r["tokens"], want) and not engine.compile


def test_a_quantized_cache_compiles_in_front():
    engine = Engine(_tiny_model("llama"), compile=True, background=True, kv_bits=4)
    assert not engine.background


def test_cache_buckets_grow_and_limit(fresh):
    model = _tiny_model("llama")
    engine = Engine(model, compile=False)
    ids = torch.randint(0, 256, (1, 300))
    out = engine.generate(ids, 10)
    assert engine.decoder.max_len == 512 and engine.cache.k0.shape[2] == 512
    assert torch.equal(out["tokens"], reference_tokens(model, ids, 10))
    with pytest.raises(LowbitError, match="exceed"):
        engine.generate(ids, 400)
    with pytest.raises(LowbitError, match="empty"):
        engine.generate(torch.zeros(1, 0, dtype=torch.long), 4)


def test_eos_stops_generation():
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 6))
    engine = Engine(model, compile=False)
    full = engine.generate(ids, 12)["tokens"]
    stop = int(full[3])
    first = next(i for i, t in enumerate(full.tolist()) if t == stop)
    out = engine.generate(ids, 12, eos_token_id=stop)["tokens"]
    assert torch.equal(out, full[:first + 1])


# --- fusing q/k/v and gate/up ----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 64, True), (4, 32, False), (8, -1, True), (3, 64, False)])
def test_fused_linears_equal_separate_calls(base, bits, group_size, symmetric):
    from lowbit.algorithms.rtn import quantize_rtn
    from lowbit.formats import IntSpec
    attn = base.model.layers[5].self_attn
    spec = IntSpec(bits, group_size, symmetric)
    mods = [QuantLinear(quantize_rtn(m.weight.detach(), spec)) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    fused = fuse_linears(mods)
    assert fused is not None and fused.kernel.name == mods[0].kernel.name
    for m in range(1, 4):
        x = torch.randn(1, m, 576, dtype=torch.bfloat16)
        want = torch.cat([q(x) for q in mods], dim=-1)
        assert torch.equal(fused(x), want)


def test_fuse_refuses_mixed_formats(base):
    from lowbit.algorithms.rtn import quantize_rtn
    from lowbit.formats import IntSpec
    attn = base.model.layers[0].self_attn
    a = QuantLinear(quantize_rtn(attn.k_proj.weight.detach(), IntSpec(4, 64)))
    b = QuantLinear(quantize_rtn(attn.v_proj.weight.detach(), IntSpec(8, -1)))
    assert fuse_linears([a, b]) is None
    assert fuse_linears([a, attn.v_proj]) is None


def test_engine_from_checkpoint(tmp_path, fresh, tokenizer, prompt_ids):
    from lowbit import save_checkpoint
    model = quantized(fresh, bits=4, group_size=64)
    save_checkpoint(model, tokenizer, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    a = Engine(model, compile=False).generate(prompt_ids, 16)["tokens"]
    b = Engine(loaded.model, compile=False).generate(prompt_ids, 16)["tokens"]
    assert torch.equal(a, b)


def test_compiled_engine_follows_a_resized_cache():
    model = _tiny_model("llama")
    engine = Engine(model, compile=True)
    short, long = torch.randint(0, 256, (1, 5)), torch.randint(0, 256, (1, 300))
    assert torch.equal(engine.generate(short, 12)["tokens"], reference_tokens(model, short, 12))
    assert torch.equal(engine.generate(long, 12)["tokens"], reference_tokens(model, long, 12))
    assert engine.decoder.max_len == 512
    assert torch.equal(engine.generate(short, 12)["tokens"], reference_tokens(model, short, 12))


# --- quantized KV cache ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, 64), (4, 16), (8, 32)])
def test_kv_quantization_round_trip_and_error_bound(bits, group_size):
    from lowbit.engine.cache import dequantize_kv, quantize_kv
    x = torch.randn(1, 3, 40, 64) * torch.logspace(-2, 1, 64)   # channels of very different ranges
    codes, scales, *mins = quantize_kv(x, bits, group_size)
    assert codes.shape[-1] == (64 if bits == 8 else 32) and scales.shape == (1, 3, 40, 64 // group_size)
    assert len(mins) == (1 if bits == 4 else 0)                  # 4-bit is asymmetric (offset per group)
    back = dequantize_kv(codes, scales, bits, group_size, torch.float32, *mins)
    step = scales.repeat_interleave(group_size, -1)
    assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().amax()).all()   # within half a step everywhere
    if bits == 4:   # the offset matters: a shifted group costs no more than a centred one
        shifted = quantize_kv(x + 100, bits, group_size)
        assert torch.allclose(shifted[1], scales, rtol=1e-3)


@pytest.mark.parametrize("bits,key_group", [(8, None), (4, None), (4, 16), (8, 16), (4, 1)])
def test_quantized_cache_decode_matches_its_prefill(bits, key_group):
    """Decoding token by token over a quantized cache gives the logits that a prefill over the same
    (round-tripped) keys and values gives: the cache stores exactly what attention reads. With per-channel
    keys (key_group), the decode crosses group boundaries: completed groups are re-read from their codes."""
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 40))
    engine = Engine(model, compile=False, kv_bits=bits, kv_key_group=key_group)
    engine.reserve(48)
    with torch.no_grad():
        want = engine.decoder(ids, engine.decoder.positions[:40], all_logits=True)[0]
        engine.prefill(ids[:, :4])
        got = [engine.decode(ids[:, i:i + 1], i)[0][0] for i in range(4, 40)]
    torch.testing.assert_close(torch.stack(got), want[4:], rtol=2e-5, atol=2e-5)
    full = Engine(model, compile=False)
    full.reserve(48)
    err = (full.prefill(ids) - want[-1:]).abs().max()
    assert 0 < err < (0.05 if bits == 8 else 0.5)
    if key_group is None:
        # fp32 model, head_dim 16: codes 1 or 0.5 byte + a 4-byte scale (and min, 4-bit) per 16 channels,
        # vs 4 bytes
        assert engine.cache.nbytes == full.cache.nbytes * (1 + 0.25 if bits == 8 else 0.5 + 0.5) // 4


@pytest.mark.parametrize("bits", [4, 8])
def test_channel_keys_error_bound_and_exact_recent_group(bits):
    from lowbit.engine.cache import ChannelKeyKVCache
    torch.manual_seed(0)
    cache = ChannelKeyKVCache(1, 2, 256, 32, torch.float32, kv_bits=bits, key_group=16)
    k = torch.randn(1, 2, 70, 32) * torch.logspace(-2, 1, 32) + torch.linspace(-5, 5, 32)  # offsets, ranges
    v = torch.randn(1, 2, 70, 32)
    cache.update(0, torch.arange(50), k[:, :, :50], v[:, :, :50])            # a prefill: 3 groups + 2 rows
    for p in range(50, 70):                                                  # then one position at a time
        cache.update(0, torch.tensor([p]), k[:, :, p:p + 1], v[:, :, p:p + 1])
    keys, _ = cache.read(0, 70)
    assert torch.equal(keys[:, :, 64:], k[:, :, 64:])                       # the filling group: exact
    scale = cache.k0_scale[:, :, :4].repeat_interleave(16, dim=2)            # one scale per channel and group
    assert ((keys[:, :, :64] - k[:, :, :64]).abs() <= scale / 2 + 1e-5).all()
    per_channel_range = k[:, :, :16].amax(2) - k[:, :, :16].amin(2)
    if bits == 4:   # asymmetric per channel: a channel's step follows its own range, offset or not
        torch.testing.assert_close(cache.k0_scale[:, :, 0], per_channel_range / 15)
    with pytest.raises(LowbitError, match="divide"):
        ChannelKeyKVCache(1, 2, 250, 32, torch.float32, kv_bits=4, key_group=16)


def test_channel_keys_beat_token_keys_on_the_default_model(fresh, tokenizer):
    """On the default model's real keys (offset rotary channels), 4-bit keys per channel lose far less than
    4-bit keys per token, at the same bytes per element."""
    import torch.nn.functional as F
    from lowbit.data import load_text, token_windows
    ids = token_windows(tokenizer, load_text(None, "evaluation"), 512, 1)[0][None]
    logp = {}
    for name, kw in [("exact", {}), ("token", {"kv_bits": 4, "kv_key_group": None}),
                     ("channel", {"kv_bits": 4})]:
        engine = Engine(fresh, compile=False, **kw)
        engine.reserve(512)
        with torch.no_grad():
            logits = engine.decoder(ids, engine.decoder.positions[:512], all_logits=True)[0]
        logp[name] = F.log_softmax(logits.float(), -1)
    kld = {n: (logp["exact"].exp() * (logp["exact"] - logp[n])).sum(-1).mean().item() for n in ("token", "channel")}
    assert kld["channel"] < kld["token"] / 3, kld


def test_kv_cache_bad_options():
    model = _tiny_model("llama")
    with pytest.raises(LowbitError, match="bits"):
        Engine(model, compile=False, kv_bits=3)
    with pytest.raises(LowbitError, match="group size"):
        Engine(model, compile=False, kv_bits=4, kv_group_size=24)


@pytest.mark.slow
def test_compiled_engines_of_different_models_do_not_share_graphs():
    """Engines keep separate compiled graphs: a 16-bit model and a quantized one with the same cache dtype
    and shapes must each run their own."""
    plain = _tiny_model("llama").to(torch.bfloat16)
    q = quantized(_tiny_model("llama"), bits=8, group_size=-1)
    ids = torch.randint(0, 256, (1, 6))
    for model in (plain, q, plain):
        engine = Engine(model, compile=True, attention="reference", dense="reference")
        assert torch.equal(engine.generate(ids, 10)["tokens"], reference_tokens(model, ids, 10))


# --- every scheme: the engine computes what the model's own forward computes ------------------------------

@pytest.mark.parametrize("method,options", [
    ("gptq", {}), ("awq", {}), ("w8a8-naive", {}), ("w8a8-smooth", {"act_granularity": "token"}),
    ("llm-int8", {}), ("llm-int8", {"outlier_fraction": 0.01}), ("fp8", {}), ("fp8", {"act": "fp8"}),
    ("rtn-3bit", {}),
])
def test_engine_equals_model_forward_for_every_scheme(base, tokenizer, method, options):
    import lowbit
    from lowbit.data import calibration_samples, load_text
    model = truncated(base, 3)
    spec = lowbit.IntSpec(3, 64, False) if method == "rtn-3bit" else lowbit.IntSpec(4, 64, False)
    scheme = lowbit.config_for("rtn" if method == "rtn-3bit" else method, spec, options=options)
    calib = calibration_samples(tokenizer, load_text(None, "calibration"), n=2, seqlen=64, seed=0)
    lowbit.quantize(model, lowbit.Recipe.default(scheme), calibration=calib, progress=False)
    ids = torch.randint(0, 49152, (1, 10))
    engine = Engine(model, compile=False, attention="reference", dense="reference")
    engine.reserve(16)
    with torch.no_grad():
        assert torch.equal(engine.prefill(ids[:, :9]), reference_logits(model, ids[:, :9]))
        logits, _ = engine.decode(ids[:, 9:], 9)
        out = model(ids[:, :9], use_cache=True)            # the reference's own decode step, one row
        want = model(ids[:, 9:], past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
    assert torch.equal(logits, want)
    assert torch.equal(engine.generate(ids[:, :9], 8)["tokens"], reference_tokens(model, ids[:, :9], 8))


@pytest.mark.parametrize("bits,key_group", [(None, None), (8, None), (4, "auto"), (4, 4)])
def test_host_kv_cache_gives_the_same_tokens_and_logits(bits, key_group):
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 7))
    plain = Engine(model, compile=False, kv_bits=bits, kv_key_group=key_group)
    host = Engine(model, compile=False, kv_bits=bits, kv_offload=True, kv_key_group=key_group)
    assert type(host.cache).__name__ == "HostKVCache" and not host.compile
    assert torch.equal(host.generate(ids, 20)["tokens"], plain.generate(ids, 20)["tokens"])
    for e in (plain, host):
        e.reserve(16)
        e.prefill(ids)
    before = host.cache.copied_bytes
    for i in range(3):
        a, _ = plain.decode(ids[:, i:i + 1], 7 + i)
        b, _ = host.decode(ids[:, i:i + 1], 7 + i)
        assert torch.equal(a, b)
    # per layer and step: the prefetched prefix once plus one new position, not the whole prefix twice
    layout = host.cache.layout
    per_layer = [layout.layer_buffers(i) for i in range(layout.layers)]
    per_position = sum(layout._buffers[n][:, :, :1].numel() * layout._buffers[n].element_size()
                       for bufs in per_layer for n, unit in bufs.items() if unit == 1)
    small = sum(layout._buffers[n].numel() * layout._buffers[n].element_size()   # group scales, newest group
                for bufs in per_layer for n, unit in bufs.items() if unit != 1)
    assert host.cache.copied_bytes - before <= per_position * (3 * 10 + 3 * layout.layers) + 3 * small
    assert type(layout).__name__ == ("ChannelKeyKVCache" if key_group else "StaticKVCache")


# (4, 16): half a minute of compiling for a path (4, "auto") also takes
@pytest.mark.parametrize("bits,key_group", [(8, None), (4, None), (4, "auto"), pytest.param(4, 16, marks=pytest.mark.slow)])
def test_compiled_engine_with_quantized_cache_equals_eager(bits, key_group):
    model = _tiny_model("llama")
    ids = torch.randint(0, 256, (1, 6))
    a = Engine(model, compile=False, kv_bits=bits, kv_key_group=key_group).generate(ids, 40)["tokens"]
    b = Engine(model, compile=True, kv_bits=bits, kv_key_group=key_group).generate(ids, 40)["tokens"]
    assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 5, 8, 16, 60, 64, 136, 576, 1000, 1024])
def test_mean_of_squares_in_atens_order_equals_atens_mean_eager_and_compiled(n):
    """The explicit-addition mean(x²) the compiled norms use, against ATen's own mean: bit for bit, eager and
    compiled, over widths with scalar tails, fewer than 4 vectors, and rows long enough for the 16-row levels."""
    import platform

    from lowbit.engine.reduction import aten_width, mean_of_squares
    width = aten_width(n)
    if width is None:
        assert platform.machine() not in ("x86_64", "AMD64"), "ATen's x86 sum order is not reproduced"
        pytest.skip("this ATen build sums in an order engine.reduction does not reproduce")
    g = torch.Generator().manual_seed(n + 1)
    x = torch.randn(3, 2, n, generator=g) * torch.exp(4 * torch.randn(3, 2, n, generator=g))
    ref = x.pow(2).mean(-1, keepdim=True)
    assert torch.equal(mean_of_squares(x, width), ref)
    if n in (60, 576):
        compiled = torch.compile(lambda t: mean_of_squares(t, width), dynamic=False)
        assert torch.equal(compiled(x), ref)
