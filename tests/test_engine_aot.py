"""The decode step compiled ahead of time (engine.aot): the eager step's tokens and logits bit for bit, across a
cache resize, from a package built here and from the same package loaded by a second engine."""

import pytest
import torch

from lowbit import LowbitError
from lowbit.engine import Engine

from conftest import quantized


def tiny_llama(vocab_size=256):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(3)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


@pytest.fixture()
def aot_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_AOT_DIR", str(tmp_path / "aot"))
    return tmp_path / "aot"


def test_aot_step_equals_eager_across_a_resize_and_a_reloaded_package(aot_dir):
    model = quantized(tiny_llama(), bits=4, group_size=32)
    ids = torch.randint(0, 256, (1, 5))
    eager, aot = Engine(model, compile=False), Engine(model, compile="aot")
    assert torch.equal(aot.generate(ids, 20)["tokens"], eager.generate(ids, 20)["tokens"])
    assert aot._step.compiled_from_scratch == 1 and len(list(aot_dir.glob("step-*.pt2"))) == 1
    for e in (eager, aot):
        e.reserve(40)
        e.prefill(ids)
    for i in range(3):   # logits too, not only the greedy tokens
        la, ta = eager.decode(ids[:, i:i + 1], 5 + i)
        lb, tb = aot.decode(ids[:, i:i + 1], 5 + i)
        assert torch.equal(la, lb) and torch.equal(ta, tb)
    # a longer request: another cache size, so another package; then back to the first size, whose package
    # must be bound again to the new cache and rotary tensors (a resize replaces them)
    long = torch.randint(0, 256, (1, 300))
    assert torch.equal(aot.generate(long, 6)["tokens"], eager.generate(long, 6)["tokens"])
    assert aot.decoder.max_len == 512
    assert torch.equal(aot.generate(ids, 12)["tokens"], eager.generate(ids, 12)["tokens"])
    # a second engine of the same graph (the packages hold no weights) loads them instead of compiling
    again = Engine(model, compile="aot")
    assert torch.equal(again.generate(ids, 20)["tokens"], eager.generate(ids, 20)["tokens"])
    assert again._step.compiled_from_scratch == 0
    assert not [p for p in aot_dir.iterdir() if not p.name.endswith(".pt2")]   # no temporary left behind


def test_the_package_key_is_read_from_the_modules_without_tracing():
    from lowbit.engine.aot import DecodeStep, package_key
    from lowbit.engine.decoder import Decoder

    def key(model):
        return package_key(DecodeStep(Decoder(model, 64)), {"cpp_wrapper": True})
    a, b = tiny_llama(), tiny_llama()
    with torch.no_grad():
        b.model.layers[0].mlp.up_proj.weight.mul_(2)   # other weights, same graph
    assert key(a) == key(b)
    c = tiny_llama()
    c.model.norm.variance_epsilon = 1e-3                # a constant of the graph
    assert key(c) != key(a)
    assert key(quantized(tiny_llama(), bits=4, group_size=32)) != key(quantized(tiny_llama(), bits=4, group_size=64))


def test_a_package_found_under_the_key_that_differs_from_eager_is_compiled_again(aot_dir, monkeypatch):
    from lowbit.engine import aot as aot_module
    monkeypatch.setattr(aot_module, "package_key", lambda step, options: "same-for-all")
    ids = torch.randint(0, 256, (1, 5))
    first = Engine(tiny_llama(), compile="aot")
    first.generate(ids, 4)
    other = tiny_llama()
    other.model.norm.variance_epsilon = 0.5             # same shapes, another graph: its logits differ
    engine = Engine(other, compile="aot")
    assert torch.equal(engine.generate(ids, 12)["tokens"], Engine(other, compile=False).generate(ids, 12)["tokens"])
    assert engine._step.rejected == 1 and engine._step.compiled_from_scratch == 1
    again = Engine(other, compile="aot")                # the package written in its place is trusted
    again.generate(ids, 4)
    assert again._step.rejected == 0 and again._step.compiled_from_scratch == 0


def test_aot_refuses_a_quantized_or_host_cache_in_one_line():
    model = tiny_llama()
    for options in ({"kv_bits": 8}, {"kv_offload": True}):
        with pytest.raises(LowbitError, match="ahead-of-time"):
            Engine(model, compile="aot", **options)


def test_auto_is_aot_on_a_cpu_with_a_plain_cache_and_torch_compile_otherwise():
    model = tiny_llama()
    assert Engine(model).kind == "aot" and Engine(model, compile="auto").kind == "aot"
    assert Engine(model, kv_bits=8).kind == "compiled"
    assert Engine(model, kv_offload=True).kind == "eager"   # a host cache runs eagerly whatever was asked
    assert Engine(model, compile=True).kind == "compiled" and Engine(model, compile=False).kind == "eager"
    with pytest.raises(LowbitError, match="unknown compile mode 'fast'"):
        Engine(model, compile="fast")


def test_generate_reports_the_engine_auto_resolved_to(aot_dir, tokenizer):
    import lowbit
    model = tiny_llama(len(tokenizer))
    r = lowbit.generate(model, tokenizer, "Hello", max_new_tokens=6)
    eager = lowbit.generate(model, tokenizer, "Hello", max_new_tokens=6, engine="eager")
    assert r["engine"] == "aot" and eager["engine"] == "eager" and r["tokens"] == eager["tokens"]


def test_aot_on_sliding_windows_uses_torch_compile(aot_dir):
    from test_architectures import _tiny_gemma3
    engine = Engine(_tiny_gemma3(), compile="aot")
    assert engine.compile is True and not list(aot_dir.glob("*"))


@pytest.mark.slow
def test_aot_step_of_a_quantized_mixture_of_experts_equals_eager(aot_dir):
    import lowbit
    from test_architectures import _tiny_qwen3_moe
    model = lowbit.quantize(_tiny_qwen3_moe(), lowbit.RTN(bits=4, group_size=16), progress=False)
    x = torch.randint(3, 256, (1, 8), generator=torch.Generator().manual_seed(1))
    aot = Engine(model, compile="aot")
    assert torch.equal(aot.generate(x, 40)["tokens"], Engine(model, compile=False).generate(x, 40)["tokens"])
    assert aot._step.compiled_from_scratch == 1


def test_a_failed_aot_compilation_falls_back_to_torch_compile(aot_dir, monkeypatch):
    from lowbit.engine import aot as aot_module

    def refuse(*args, **kwargs):
        raise RuntimeError("export refused")
    monkeypatch.setattr(aot_module.torch.export, "export", refuse)
    monkeypatch.setenv("LOWBIT_STRICT_COMPILE", "0")   # conftest makes compile failures raise
    model = tiny_llama()
    ids = torch.randint(0, 256, (1, 5))
    engine = Engine(model, compile="aot")
    with pytest.warns(UserWarning, match="ahead of time failed.*export refused.*torch.compile"):
        got = engine.generate(ids, 8)["tokens"]
    assert engine.compile is True and torch.equal(got, Engine(model, compile=False).generate(ids, 8)["tokens"])


def test_aot_compiles_in_the_background_while_decoding_eagerly(aot_dir):
    """Eager steps run while the step is exported and compiled in another thread (strict export leaves the modules
    alone), then the AOT step takes over; the tokens are the eager engine's either way."""
    from lowbit.engine.aot import AotStep
    model = quantized(tiny_llama(), bits=4, group_size=32)
    ids = torch.randint(0, 256, (1, 5))
    want = Engine(model, compile=False).generate(ids, 120)["tokens"]
    engine = Engine(model, compile="aot", background=True)
    r = engine.generate(ids, 120)
    engine.wait_compiled()
    assert torch.equal(r["tokens"], want) and r["eager_tokens"] >= 1
    again = engine.generate(ids, 120)
    assert again["eager_tokens"] == 0 and torch.equal(again["tokens"], want)
    assert isinstance(engine._step, AotStep) and engine._step.compiled_from_scratch == 1
    # the next engine loads the package in the background and checks it on its first compiled step (while the
    # package loads, the eager steps beside it change the cache, so the check cannot happen there)
    warm = Engine(model, compile="aot", background=True)
    r = warm.generate(ids, 120)
    warm.wait_compiled()
    assert torch.equal(r["tokens"], want) and torch.equal(warm.generate(ids, 120)["tokens"], want)
    assert warm._step.compiled_from_scratch == 0 and warm._step.rejected == 0 and not warm._step.unchecked
