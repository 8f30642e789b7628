"""Offloading: saved activations moved to the host give bit-identical gradients."""

import pytest
import torch

from lowbit.offload import offload_activations


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).train()


def _grads(model, ids, offload=None, ckpt=False):
    model.zero_grad(set_to_none=True)
    if ckpt:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.activation_checkpointing_disable()
    if offload is not None:
        with offload:
            loss = model(ids, labels=ids).loss
    else:
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ckpt", [False, True])
def test_gradients_bit_identical_with_offloading(ckpt):
    model = _tiny()
    ids = torch.randint(0, 256, (2, 48))
    loss0, g0 = _grads(model, ids, ckpt=ckpt)
    off = offload_activations(min_bytes=1024)
    loss1, g1 = _grads(model, ids, off, ckpt=ckpt)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert off.stats.tensors > 0 and off.stats.restored == off.stats.tensors
    assert off.stats.bytes > 0


def test_checkpointing_leaves_less_to_offload():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 48))
    plain, ck = offload_activations(min_bytes=1024), offload_activations(min_bytes=1024)
    _grads(model, ids, plain)
    _grads(model, ids, ck, ckpt=True)
    assert 0 < ck.stats.bytes < plain.stats.bytes


def test_small_tensors_and_parameters_stay():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    off = offload_activations(min_bytes=1 << 20)
    with off:
        y = (x @ w).sum()
    y.backward()
    assert off.stats.tensors == 0 and off.stats.kept >= 2
    with pytest.raises(ValueError):
        offload_activations(max_in_flight=0)


# --- streaming blocks under a budget ---------------------------------------------------------------------

import copy  # noqa: E402

from lowbit import LowbitError  # noqa: E402
from lowbit.offload import offload_blocks, parse_size, plan_offload  # noqa: E402
from lowbit.nn.surgery import module_tensors  # noqa: E402

from conftest import quantized, truncated  # noqa: E402


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1.5GiB") == int(1.5 * 2**30)
    assert parse_size("800 MB") == 800_000_000 and parse_size("1234") == 1234
    with pytest.raises(LowbitError, match="cannot read the size"):
        parse_size("lots")


def test_planner_decisions():
    blocks = [10, 10, 10, 10, 10]
    assert plan_offload(5, blocks, 100).streamed == []                       # all fits
    p = plan_offload(5, blocks, 45)                                          # 5 fixed + 2 resident + 2 streaming
    assert p.resident == [0, 1] and p.streamed == [2, 3, 4] and p.peak_weight_bytes == 45
    assert p.bytes_moved_per_pass == 30 and "streamed blocks: 2-4" in p.describe()
    assert plan_offload(5, blocks, 25).resident == []
    with pytest.raises(LowbitError, match="too small"):
        plan_offload(5, blocks, 24)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("store", ["ram", "disk"])
@pytest.mark.parametrize("scheme", ["fp32", "int4"])
def test_streamed_logits_identical_to_resident(base, tmp_path, store, scheme):
    model = truncated(base, 6)
    if scheme == "int4":
        model = quantized(model, 4, 64, False)
    ids = torch.randint(0, 49152, (1, 24))
    want = _logits(model, ids)
    per_block = sum(t.numel() * t.element_size() for t in module_tensors(model.model.layers[0]).values())
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    sm = offload_blocks(model, fixed + 3.5 * per_block, tmp_path / "off" if store == "disk" else None)
    try:
        assert sm.plan.resident == [0] and sm.plan.streamed == [1, 2, 3, 4, 5]
        assert torch.equal(_logits(model, ids), want)
        assert torch.equal(_logits(model, ids), want)      # and again: blocks released and re-read
        # the reader runs ahead: each streamed block but the very first was read before it was needed
        ev = sm.events
        t = {(w, i): ts for w, i, ts in ev}                   # last occurrence of each
        for prev, nxt in zip(sm.plan.streamed, sm.plan.streamed[1:]):
            starts = [ts for w, i, ts in ev if w == "read_start" and i == nxt]
            assert any(s < t[("compute_end", prev)] for s in starts)
        assert all(model.model.layers[i].mlp.down_proj._buffers.get("wpack", torch.empty(1)).numel() == 0
                   if scheme == "int4" else model.model.layers[i].mlp.down_proj.weight.numel() == 0
                   for i in sm.plan.streamed)                  # released after use
    finally:
        sm.close()


@pytest.mark.parametrize("scheme", ["fp32", "int4"])
def test_engine_over_streamed_blocks_equals_resident(base, tmp_path, scheme):
    from lowbit.engine import Engine
    model = truncated(base, 6)
    if scheme == "int4":
        model = quantized(model, 4, 64, False)
    ids = torch.randint(0, 49152, (1, 10))
    resident = Engine(model, compile=False)
    want_tokens = resident.generate(ids, 12)["tokens"]
    resident.reserve(16)
    with torch.no_grad():
        want_prefill = resident.prefill(ids[:, :9])
        want_decode, _ = resident.decode(ids[:, 9:], 9)
    del resident
    per_block = sum(t.numel() * t.element_size() for t in module_tensors(model.model.layers[0]).values())
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    sm = offload_blocks(model, fixed + 3.5 * per_block, tmp_path / "off")
    try:
        engine = Engine(model)                      # asks for compiling; streamed blocks make it run eagerly
        assert not engine.compile and engine.decoder.streamed == {1, 2, 3, 4, 5}
        assert torch.equal(engine.generate(ids, 12)["tokens"], want_tokens)
        engine.reserve(16)
        with torch.no_grad():
            assert torch.equal(engine.prefill(ids[:, :9]), want_prefill)
            assert torch.equal(engine.decode(ids[:, 9:], 9)[0], want_decode)
        computed = [i for w, i, _ in sm.events if w == "compute_start"]
        assert computed[:5] == [1, 2, 3, 4, 5] and len(computed) == 5 * (12 + 2)   # every block, every pass
        assert all(model.model.layers[i].self_attn.o_proj._buffers.get("wpack", torch.empty(1)).numel() == 0
                   if scheme == "int4" else model.model.layers[i].self_attn.o_proj.weight.numel() == 0
                   for i in sm.plan.streamed)                  # released after use
    finally:
        sm.close()


def _generating_dir(tiny_dir, root, layers: int):
    """A tiny random llama model directory whose vocabulary is its tokenizer's, so that text prompts work."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(3)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), tie_word_embeddings=True,
                      max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def test_cli_generate_under_a_budget(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.offload.lazy import block_sizes
    _generating_dir(tiny_dir, tmp_path / "m", layers=6)
    fixed, per_block = block_sizes(tmp_path / "m", torch.bfloat16)
    budget = str(int(fixed + 3.5 * per_block[0]))
    args = ["generate", str(tmp_path / "m"), "--prompt", "Python is", "--max-new-tokens", "12",
            "--max-memory", budget]
    assert main(args + ["--engine", "hf"]) == 0               # transformers' generate over the streamed model
    want = capsys.readouterr().out
    assert main(args) == 0                                    # lowbit's engine, streamed blocks unfused
    out, err = capsys.readouterr()
    assert "streamed blocks: 1-5" in err and "eager engine" in err
    assert out == want and out.strip()


@pytest.mark.parametrize("method,options", [
    ("gptq", {}), ("awq", {}), ("w8a8-naive", {}), ("w8a8-smooth", {"act_granularity": "token"}),
    ("llm-int8", {}), ("fp8", {}), ("fp8", {"act": "fp8"}), ("rtn-3bit", {}),
])
def test_every_scheme_streams_to_identical_logits(base, tokenizer, tmp_path, method, options):
    """Whatever state a scheme keeps (packed codes, scales, smoothing factors, outlier columns, FP8 activation
    scales) lives in the block's parameters and buffers, so a streamed block computes what the resident one
    does: through the model's forward and through lowbit's engine."""
    import lowbit
    from lowbit.data import calibration_samples, load_text
    from lowbit.engine import Engine
    model = truncated(base, 4)
    spec = lowbit.IntSpec(3, 64, False) if method == "rtn-3bit" else lowbit.IntSpec(4, 64, False)
    scheme = lowbit.config_for("rtn" if method == "rtn-3bit" else method, spec, options=options)
    calib = calibration_samples(tokenizer, load_text(None, "calibration"), n=2, seqlen=64, seed=0)
    lowbit.quantize(model, lowbit.Recipe.default(scheme), calibration=calib, progress=False)
    ids = torch.randint(1, 49152, (1, 12))
    want = _logits(model, ids)
    want_tokens = Engine(model, compile=False).generate(ids, 6)["tokens"]
    per_block = sum(t.numel() * t.element_size() for t in module_tensors(model.model.layers[0]).values())
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    sm = offload_blocks(model, fixed + 3.5 * per_block, tmp_path / "off")
    try:
        assert sm.plan.streamed == [1, 2, 3]
        assert torch.equal(_logits(model, ids), want)
        assert torch.equal(Engine(model, compile=False).generate(ids, 6)["tokens"], want_tokens)
    finally:
        sm.close()


def test_corrupted_shard_and_bad_directories(base, tmp_path):
    model = truncated(base, 4)
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    per_block = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    with pytest.raises(LowbitError, match="too small"):
        offload_blocks(model, fixed + per_block, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    with pytest.raises(LowbitError, match="not empty"):
        offload_blocks(copy.deepcopy(model), fixed + 2.5 * per_block, tmp_path / "full")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LowbitError, match="cannot write"):
        offload_blocks(copy.deepcopy(model), fixed + 2.5 * per_block, blocker / "sub")
    m = copy.deepcopy(model)
    sm = offload_blocks(m, fixed + 2.5 * per_block, tmp_path / "ok")
    sm.close()
    shard = tmp_path / "ok" / sm.store.shards[sm.plan.streamed[-1]]["file"]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    from lowbit.offload import DiskStore
    store = DiskStore(tmp_path / "ok")
    with pytest.raises(LowbitError, match="corrupted"):
        store.load(sm.plan.streamed[-1])
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary directory left


def test_full_disk_and_a_shard_cut_while_streaming(base, tmp_path, monkeypatch):
    import errno
    from pathlib import Path
    from lowbit.offload import store
    model = truncated(base, 4)
    ids = torch.randint(1, 49152, (1, 8))
    want = _logits(model, ids)
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    per_block = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    real_save, calls = store.write_safetensors, []

    def save_until_full(tensors, path, *a, **k):     # the second shard finds the disk full, half-written
        calls.append(path)
        if len(calls) == 2:
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *a, **k)

    monkeypatch.setattr(store, "write_safetensors", save_until_full)
    with pytest.raises(LowbitError, match="No space left on device"):
        offload_blocks(copy.deepcopy(model), fixed + 2.5 * per_block, tmp_path / "off")
    assert not (tmp_path / "off").exists() and not list(tmp_path.iterdir())   # nothing half-written left
    monkeypatch.setattr(store, "write_safetensors", real_save)
    sm = offload_blocks(model, fixed + 2.5 * per_block, tmp_path / "off")
    try:
        assert torch.equal(_logits(model, ids), want)     # every shard read (and verified) once
        shard = tmp_path / "off" / sm.store.shards[sm.plan.streamed[-1]]["file"]
        shard.write_bytes(shard.read_bytes()[:-1000])      # cut after it was verified
        with pytest.raises(LowbitError, match="truncated"):
            _logits(model, ids)                            # the reader's error reaches the caller: no hang
    finally:
        sm.close()


def test_open_streamed_reads_blocks_from_the_model_files(tiny_dir, tmp_path):
    from lowbit.offload import open_streamed
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "m")
    tiny_dir = tmp_path / "m"
    full = lowbit_load(tiny_dir).model
    ids = torch.randint(0, 1000, (1, 16))
    want = _logits(full, ids)
    per_block = sum(p.numel() * p.element_size() for p in full.model.layers[0].parameters())
    fixed = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if ".layers." not in n)
    loaded, sm = open_streamed(tiny_dir, fixed + 3.5 * per_block, dtype=torch.float32)
    try:
        assert sm.plan.resident == [0] and sm.plan.streamed == [1, 2, 3, 4]
        assert all(p.numel() == 0 for p in loaded.model.model.layers[3].parameters())   # never loaded whole
        assert torch.equal(_logits(loaded.model, ids), want)
        assert torch.equal(_logits(loaded.model, ids), want)
    finally:
        sm.close()
    with pytest.raises(LowbitError, match="too small"):
        open_streamed(tiny_dir, fixed, dtype=torch.float32)


def lowbit_load(path):
    import lowbit
    return lowbit.load_model(path)


# --- quantizing block by block from disk ------------------------------------------------------------------

def _tiny_hf_dir(tiny_dir, root, layers=5):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    torch.manual_seed(2)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(root)
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(root)
    return root


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "rtn+head"])
def test_quantize_streamed_equals_in_memory(tiny_dir, tmp_path, method):
    import lowbit
    from lowbit.offload import quantize_streamed
    src = _tiny_hf_dir(tiny_dir, tmp_path / "src")
    scheme = lowbit.config_for(method.split("+")[0], lowbit.IntSpec(4, 32, False))
    recipe = (lowbit.Recipe.from_rules([{"match": "lm_head", "bits": 8, "group_size": -1}], scheme)
              if method.endswith("head") else lowbit.Recipe.default(scheme))
    calib = torch.randint(0, 1000, (4, 32)) if method in ("gptq", "awq") else None
    mem = lowbit.quantize(lowbit.load_model(src).model, recipe, calibration=calib, progress=False)
    out = quantize_streamed(src, tmp_path / "q", recipe, calibration=calib, progress=False)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-block-*"))) == 5
    loaded = lowbit.load_model(out)
    ids = torch.randint(0, 1000, (1, 20))
    assert torch.equal(_logits(loaded.model, ids), _logits(mem, ids))
    assert loaded.model.lowbit["settings"]["streamed"] is True


def test_quantize_streamed_leaves_nothing_on_error(tiny_dir, tmp_path):
    from lowbit.offload import quantize_streamed
    from safetensors.torch import load_file, save_file
    src = _tiny_hf_dir(tiny_dir, tmp_path / "src")
    f = src / "model.safetensors"
    t = load_file(str(f))
    t["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(LowbitError, match="model.layers.3.mlp.up_proj.weight contains NaN"):
        quantize_streamed(src, tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_cli_quantize_stream(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    src = _tiny_hf_dir(tiny_dir, tmp_path / "src", layers=3)
    assert main(["quantize", str(src), "--stream", "--bits", "4", "--group-size", "32", "--out",
                 str(tmp_path / "q")]) == 0
    assert "3 block shards" in capsys.readouterr().out
    assert main(["quantize", "default", "--stream", "--out", str(tmp_path / "x")]) == 2
    assert "streamed quantization reads a Hugging Face" in capsys.readouterr().err


def test_load_with_budget_chooses_how(tiny_dir, tmp_path):
    from lowbit.offload import load_with_budget, streaming_of
    src = _tiny_hf_dir(tiny_dir, tmp_path / "src", layers=5)
    with pytest.raises(LowbitError, match="offload_dir needs max_memory"):
        load_with_budget(src, offload_dir=tmp_path / "off")
    loaded, sm = load_with_budget(src)                                   # no budget: loaded whole
    assert sm is None and streaming_of(loaded.model) is None
    from lowbit.offload.lazy import block_sizes
    fixed, per_block = block_sizes(src, torch.bfloat16)
    loaded, sm = load_with_budget(src, int(fixed + 3.5 * per_block[0]))   # a directory: opened lazily
    try:
        assert sm.store.kind == "safetensors" and sm.plan.streamed == [1, 2, 3, 4]
        assert streaming_of(loaded.model) is sm and loaded.model.lowbit_streaming is sm
    finally:
        sm.close()
    assert streaming_of(loaded.model) is None                            # closing detaches the state
    fixed, per_block = block_sizes(src, torch.float32)
    loaded, sm = load_with_budget(src, str(int(fixed + 3.5 * per_block[0])), tmp_path / "off")   # loaded, then offloaded
    try:
        assert sm.store.kind == "disk" and sm.plan.streamed == [1, 2, 3, 4] and (tmp_path / "off" / "offload.json").is_file()
    finally:
        sm.close()


def test_a_shard_damaged_after_writing_is_an_error_on_its_first_read(base, tmp_path):
    """The store hashes each shard on its first read in a run, including the run that wrote it."""
    model = truncated(base, 3)
    fixed = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if ".layers." not in n)
    per_block = sum(t.numel() * t.element_size() for t in model.model.layers[0].parameters())
    sm = offload_blocks(model, fixed + 2.5 * per_block, tmp_path / "off")
    try:
        shard = tmp_path / "off" / sm.store.shards[sm.plan.streamed[-1]]["file"]
        data = bytearray(shard.read_bytes())
        data[-100] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(LowbitError, match="corrupted"):
            _logits(model, torch.randint(0, 49152, (1, 8)))
    finally:
        sm.close()


def test_nan_weights_are_refused_on_the_streaming_path(tiny_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    from lowbit.offload import open_streamed
    src = _tiny_hf_dir(tiny_dir, tmp_path / "src", layers=4)
    f = src / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.3.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(f), metadata={"format": "pt"})
    per_block = sum(t.numel() * t.element_size() for n, t in tensors.items() if n.startswith("model.layers.0."))
    fixed = sum(t.numel() * t.element_size() for n, t in tensors.items() if ".layers." not in n)
    loaded, sm = open_streamed(src, fixed + 2.5 * per_block, dtype=torch.float32)
    try:
        assert 3 in sm.plan.streamed
        with pytest.raises(LowbitError, match=r"model.layers.3.mlp.up_proj.weight contains NaN or Inf \(in model.safetensors\)"):
            _logits(loaded.model, torch.randint(0, 1000, (1, 8)))
    finally:
        sm.close()


def test_offload_directory_is_reused_replaced_or_removed(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.offload.lazy import block_sizes
    src = _generating_dir(tiny_dir, tmp_path / "src", layers=5)
    other = _generating_dir(tiny_dir, tmp_path / "other", layers=5)
    from safetensors.torch import load_file, save_file
    t = load_file(str(other / "model.safetensors"))
    t["model.layers.4.mlp.up_proj.weight"] += 1.0                       # another model, same shapes
    save_file(t, str(other / "model.safetensors"), metadata={"format": "pt"})
    fixed, per_block = block_sizes(src, torch.float32)    # loaded whole (in float32) before offloading
    off = tmp_path / "off"
    args = ["--prompt", "Python is", "--max-new-tokens", "4", "--engine", "eager", "--max-memory",
            str(int(fixed + 2.5 * per_block[0])), "--offload-dir", str(off)]
    assert main(["generate", str(src), *args]) == 0
    assert not off.exists()                                              # removed at exit by default
    capsys.readouterr()
    assert main(["generate", str(src), *args, "--keep-offload"]) == 0
    first = capsys.readouterr().out
    manifest = (off / "offload.json").read_text()
    stamp = (off / "offload.json").stat().st_mtime_ns
    assert main(["generate", str(src), *args, "--keep-offload"]) == 0    # the same model: reused as it is
    assert capsys.readouterr().out == first and (off / "offload.json").stat().st_mtime_ns == stamp
    assert main(["generate", str(other), *args, "--keep-offload"]) == 0  # another model: replaced
    assert (off / "offload.json").read_text() != manifest
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("x")
    code = main(["generate", str(src), *args[:-1], str(tmp_path / "theirs")])
    assert code == 2 and (tmp_path / "theirs" / "notes.txt").exists()   # not lowbit's: never touched


def _tiny_moe_dir(tokenizer_dir, root, family):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    cfg = AutoConfig.for_model(
        family, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, head_dim=16, vocab_size=1000, max_position_embeddings=256, num_experts=4,
        num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root)
    return root


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_mixture_of_experts_streams_and_quantizes_block_by_block(tiny_dir, tmp_path, family):
    """transformers writes experts one Linear each (qwen: gate/up/down_proj, mixtral: w1/w3/w2) and stacks them
    in memory; streamed blocks are read in lowbit's per-expert layout, so streaming gives the logits of the
    model held whole, and streamed quantization quantizes every expert as in memory."""
    import lowbit
    from lowbit.models.moe import ExpertList, unstack_experts
    from lowbit.offload import open_streamed, quantize_streamed
    src = _tiny_moe_dir(tiny_dir, tmp_path / "src", family)
    full = lowbit.load_model(src).model
    ids = torch.randint(3, 1000, (1, 20))
    stacked = _logits(full, ids)
    unstack_experts(full)
    want = _logits(full, ids)
    torch.testing.assert_close(want, stacked, rtol=0, atol=1e-5)    # the routed loop sums in another order
    per_block = sum(p.numel() * p.element_size() for p in full.model.layers[0].parameters())
    fixed = sum(p.numel() * p.element_size() for n, p in full.named_parameters() if ".layers." not in n)
    loaded, sm = open_streamed(src, fixed + 2.5 * per_block, dtype=torch.float32)
    try:
        assert sm.plan.streamed == [0, 1, 2, 3]
        assert torch.equal(_logits(loaded.model, ids), want)
    finally:
        sm.close()
    scheme = lowbit.GPTQ(bits=4, group_size=32, symmetric=False)
    calib = torch.randint(3, 1000, (4, 32))
    mem = lowbit.quantize(lowbit.load_model(src).model, scheme, calibration=calib, progress=False)
    out = quantize_streamed(src, tmp_path / "q", scheme, calibration=calib, progress=False)
    q = lowbit.load_model(out).model
    experts = q.model.layers[2].mlp.experts
    assert isinstance(experts, ExpertList) and isinstance(experts[3].down_proj, lowbit.nn.QuantLinear)
    assert torch.equal(_logits(q, ids), _logits(mem, ids))
