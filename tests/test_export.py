"""Exports for serving engines (compressed-tensors, GPTQ, AWQ) and loading them back: round trips are bit-exact,
compressed-tensors' own loader (transformers + compressed-tensors, CPU) decompresses lowbit's weights exactly,
GPTQ/AWQ tensors decode by an independent reading of their specifications to lowbit's weights, bad input fails
cleanly."""

import json
import os
import subprocess

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError
from lowbit.export import export
from lowbit.nn import QuantLinear

IDS = torch.arange(3, 35).reshape(1, 32)


def _quantized(tiny_dir, scheme, rules=None):
    loaded = lowbit.load_model(tiny_dir)
    recipe = lowbit.Recipe.from_rules(rules, scheme) if rules else lowbit.Recipe.default(scheme)
    lowbit.quantize(loaded.model, recipe, progress=False, tokenizer=loaded.tokenizer,
                    calibration=["Some calibration text for the smoothing factors."] * 4, calib_samples=2,
                    calib_seqlen=16)
    return loaded


def _qmods(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


MIXED = [{"match": "*.mlp.*", "bits": 8, "group_size": -1}, {"match": "model.layers.0.self_attn.q_proj", "keep": True}]
CASES = [
    ("compressed-tensors", lowbit.RTN(bits=4, group_size=32, symmetric=False), None),
    ("compressed-tensors", lowbit.RTN(bits=3, group_size=32), MIXED),
    ("compressed-tensors", lowbit.SmoothQuant(alpha=0.5, act_granularity="tensor"), None),
    ("compressed-tensors", lowbit.FP8(act="fp8"), None),
    ("gptq", lowbit.RTN(bits=4, group_size=32, symmetric=False), MIXED),
    ("gptq", lowbit.RTN(bits=3, group_size=32), None),
    ("awq", lowbit.RTN(bits=4, group_size=32, symmetric=False), None),
]


@pytest.mark.parametrize("fmt,scheme,rules", CASES, ids=lambda x: getattr(x, "name", None) or str(x)[:12])
def test_round_trip_is_exact(tiny_dir, tmp_path, fmt, scheme, rules):
    q = _quantized(tiny_dir, scheme, rules)
    out, _ = export(q, fmt, tmp_path / "x")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == fmt
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    back = lowbit.load_model(out)
    a, b = _qmods(q.model), _qmods(back.model)
    assert set(a) == set(b)
    for n in a:
        assert a[n].spec == b[n].spec and a[n].act == b[n].act
        assert torch.equal(a[n].dequantized_weight(), b[n].dequantized_weight())
    with torch.no_grad():
        assert torch.equal(q.model(IDS).logits, back.model(IDS).logits)


MIXED_ASYM8 = [{"match": "*.mlp.*", "bits": 8, "group_size": -1, "symmetric": False},
               {"match": "model.layers.0.self_attn.q_proj", "keep": True}]


def _ct_reference_weights(out):
    """Dense weights as compressed-tensors itself decodes the directory: its target/ignore matching on the model
    built from config.json, then each group's registered compressor. transformers 5.24 wraps this in two ways,
    each broken for some exports: its dequantize path (run_compressed=False) decodes every dense module with the
    first config group's scheme (`get_dense_scheme`), so a mixed recipe comes out wrong; its compressed path
    (run_compressed=True) builds meta parameters without packing asymmetric zero points and rejects the stored
    packed ones as a size mismatch."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils import match_named_modules
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(str(out))
    qcfg = QuantizationConfig.model_validate(config.quantization_config)
    del config.quantization_config
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    t = {}
    for f in out.glob("*.safetensors"):
        t.update(load_file(str(f)))
    weights = {}
    for group in qcfg.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(group.format or qcfg.format)
        for name, _ in match_named_modules(skeleton, group.targets, qcfg.ignore):
            assert name not in weights, f"{name} matched by two config groups"
            sd = {k[len(name) + 1:]: v for k, v in t.items() if k.rsplit(".", 1)[0] == name}
            weights[name] = compressor.decompress(sd, group)["weight"]
    return weights


LOADER_CASES = [   # (scheme, rules, how the real loader is reached)
    (lowbit.RTN(bits=4, group_size=32, symmetric=False), None, "dequantize"),
    (lowbit.RTN(bits=3, group_size=32), MIXED, "compressed"),
    (lowbit.RTN(bits=3, group_size=32), MIXED_ASYM8, "compressed-tensors"),
]


@pytest.mark.parametrize("scheme,rules,path", LOADER_CASES, ids=["asym4", "mixed-sym8", "mixed-asym8"])
def test_compressed_tensors_loader_agrees(tiny_dir, tmp_path, scheme, rules, path):
    """Single-scheme exports load through transformers' dequantize path; mixed ones through its compressed path
    (float32, then decompressed) or, with asymmetric packed zero points, through compressed-tensors' own
    matching and compressors (see `_ct_reference_weights` for why)."""
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    q = _quantized(tiny_dir, scheme, rules)
    out, _ = export(q, "compressed-tensors", tmp_path / "ct")
    mine = _qmods(q.model)
    if path == "compressed-tensors":
        theirs = _ct_reference_weights(out)
        assert set(theirs) == set(mine)
        for n, m in mine.items():
            assert torch.equal(theirs[n], m.dequantized_weight(theirs[n].dtype)), n
        return
    kw = {"dtype": torch.float32} if path == "compressed" else {}
    hf = AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(run_compressed=path == "compressed"), **kw)
    if path == "compressed":
        hf.hf_quantizer.compressor.decompress_model(hf)
    for n, m in mine.items():
        w = hf.get_submodule(n).weight
        assert torch.equal(w, m.dequantized_weight(w.dtype)), n
    with torch.no_grad():
        a, b = q.model(IDS).logits.float(), hf(IDS).logits.float()
    # 16-bit activations in lowbit (and in the dequantize path): the matmuls round differently, by about one
    # unit in the last place
    assert (a - b).abs().max() <= 2 * 2**-7 * a.abs().max()


def _gptq_reference(t, bits, k):
    """GPTQ v1 dequantization written from its specification, independent of lowbit's packing code."""
    qw, qz, s, g = t["qweight"].long() & 0xFFFFFFFF, t["qzeros"].long() & 0xFFFFFFFF, t["scales"].float(), t["g_idx"].long()
    def stream(words, count):   # column-wise little-endian bit stream over 32-bit words (rows of `words`)
        bitsarr = ((words.unsqueeze(1) >> torch.arange(32).view(1, 32, 1)) & 1).reshape(-1, words.shape[-1])
        vals = bitsarr[: count * bits].reshape(count, bits, -1)
        return (vals * (1 << torch.arange(bits)).view(1, bits, 1)).sum(1)
    q = stream(qw, k)                                  # [K, N]
    z = stream(qz.T, qz.shape[1] * 32 // bits).T + 1   # [G, N]
    return ((q - z[g]).float() * s[g]).T               # [N, K]


def _awq_reference(t, group):
    order = [0, 4, 1, 5, 2, 6, 3, 7]
    def unpack(w):
        nib = torch.stack([(w.long() >> (4 * i)) & 0xF for i in range(8)], -1)   # [R, C/8, 8] in nibble order
        return nib[:, :, order].reshape(w.shape[0], -1)
    q, z, s = unpack(t["qweight"]), unpack(t["qzeros"]), t["scales"].float()
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]).float() * s[g]).T


@pytest.mark.parametrize("fmt,bits", [("gptq", 4), ("gptq", 3), ("gptq", 8), ("awq", 4)])
def test_gptq_awq_match_reference_decoders(tiny_dir, tmp_path, fmt, bits):
    from safetensors.torch import load_file
    q = _quantized(tiny_dir, lowbit.RTN(bits=bits, group_size=32, symmetric=bits == 3))
    out, _ = export(q, fmt, tmp_path / fmt)
    t = {}
    for f in out.glob("*.safetensors"):
        t.update(load_file(str(f)))
    for n, m in _qmods(q.model).items():
        mine = {k.rsplit(".", 1)[1]: v for k, v in t.items() if k.rsplit(".", 1)[0] == n}
        ref = _gptq_reference(mine, bits, m.in_features) if fmt == "gptq" else _awq_reference(mine, 32)
        assert torch.equal(ref, m.dequantized_weight()), n


def test_unexpressible_schemes_fail_and_write_nothing(tiny_dir, tmp_path):
    q3 = _quantized(tiny_dir, lowbit.RTN(bits=3, group_size=32))
    with pytest.raises(LowbitError, match=r"AWQ cannot hold model\.layers\.0\..*4-bit"):
        export(q3, "awq", tmp_path / "a")
    int8 = _quantized(tiny_dir, lowbit.LLMInt8())
    for fmt in ("compressed-tensors", "gptq"):
        with pytest.raises(LowbitError, match="cannot hold model.layers.0"):
            export(int8, fmt, tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_missing_shard_unknown_config(tiny_dir, tmp_path):
    q = _quantized(tiny_dir, lowbit.RTN(bits=4, group_size=32))
    out, _ = export(q, "gptq", tmp_path / "g")
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(LowbitError, match="already exists"):
        export(q, "gptq", out)
    assert sorted(p.name for p in out.iterdir()) == before
    next(out.glob("model-*.safetensors")).unlink()
    with pytest.raises(LowbitError, match="lacks the shard"):
        lowbit.load_model(out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LowbitError, match="unknown quantization_config"):
        lowbit.load_model(out)


def test_cli_export_tp_warning(tiny_dir, tmp_path, capsys):
    from lowbit.cli import main
    q = _quantized(tiny_dir, lowbit.RTN(bits=4, group_size=32))
    lowbit.save(q, tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "compressed-tensors", "--out", str(tmp_path / "o"),
                 "--tp", "3"]) == 0
    err = capsys.readouterr().err
    assert "does not split across tp=3" in err
    assert main(["export", str(tmp_path / "ckpt"), "--format", "awq", "--out", str(tmp_path / "o")]) == 2


def test_cli_writes_the_same_files_whatever_kernel_the_model_ran(tiny_dir, tmp_path):
    """`lowbit quantize --format X` quantizes with the reference kernel unless told otherwise (nothing runs the
    model before it is written); the files are the same bytes as from a model packed for a CPU kernel."""
    from lowbit.cli import main
    from lowbit.kernels import native
    packed = ["native-int4"] if native.available() else []
    for fmt, scheme, kernels in (("gptq", ["--bits", "4", "--group-size", "32"], ["auto", "cpu-int4"] + packed),
                                 ("gguf", ["--gguf-type", "Q4_0"], ["auto"] + packed)):
        outs = []
        for kernel in kernels:
            out = tmp_path / f"{fmt}-{kernel}"
            assert main(["--quiet", "quantize", str(tiny_dir), *scheme, "--format", fmt, "--kernel", kernel,
                         "--out", str(out)]) == 0
            files = sorted(f for f in out.rglob("*") if f.is_file()) if out.is_dir() else [out]
            outs.append({str(f.relative_to(out)) if out.is_dir() else "": f.read_bytes() for f in files})
        assert len(outs) > 1 or not packed and fmt == "gguf"
        assert all(o == outs[0] for o in outs[1:]), fmt


@pytest.mark.slow   # two streamed quantizations and a failing third
def test_cli_quantize_stream_exports(tiny_dir, tmp_path, capsys):
    """--stream with --format writes the target format (through a lowbit checkpoint that is then removed),
    equal to exporting the streamed checkpoint; a scheme the format cannot hold leaves nothing behind."""
    from lowbit.cli import main
    args = ["--quiet", "quantize", str(tiny_dir), "--stream", "--bits", "4", "--group-size", "32", "--asym"]
    assert main(args + ["--out", str(tmp_path / "ck")]) == 0
    assert main(args + ["--format", "awq", "--out", str(tmp_path / "awq")]) == 0
    assert "(awq), quantized block by block" in capsys.readouterr().out
    assert json.loads((tmp_path / "awq" / "config.json").read_text())["quantization_config"]["quant_method"] == "awq"
    a, b = _qmods(lowbit.load_model(tmp_path / "ck").model), _qmods(lowbit.load_model(tmp_path / "awq").model)
    assert set(a) == set(b) and all(torch.equal(a[n].dequantized_weight(), b[n].dequantized_weight()) for n in a)
    assert main(["--quiet", "quantize", str(tiny_dir), "--stream", "--bits", "3", "--group-size", "32",
                 "--format", "awq", "--out", str(tmp_path / "bad")]) == 2
    assert "AWQ cannot hold" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["awq", "ck"]


GPTQ_VENV = os.environ.get("LOWBIT_GPTQ_VENV", "/tmp/gptq-venv")   # torch 2.13.0, transformers 5.24, GPTQModel 7.6
_FOREIGN_PROBE = """
import sys, torch
from transformers import AutoModelForCausalLM
d, names = sys.argv[1], sys.argv[2].split(",")
m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, device_map="cpu")
w = {n: m.get_submodule(n).dequantize_weight().T for n in names if hasattr(m.get_submodule(n), "dequantize_weight")}
with torch.no_grad():
    logits = m(torch.arange(3, 35).reshape(1, 32)).logits
torch.save({"weights": w, "logits": logits}, d + "/probe.pt")
"""


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_gptq_awq_real_loader(tiny_dir, tmp_path, fmt):
    """transformers' own GPTQ/AWQ loading (optimum + GPTQModel 7.6 on CPU, in a separate environment since
    GPTQModel would replace this one's numpy): GPTQModel's dequantization (float16 arithmetic) equals lowbit's
    weights rounded to float16; its CPU kernel (aten int4pack matmul in bfloat16) gives logits within bfloat16
    rounding of lowbit's float32 ones. Mixed GPTQ recipes are not checked: that path ignores `dynamic`."""
    python = os.path.join(GPTQ_VENV, "bin", "python")
    if not os.path.isfile(python):
        pytest.skip(f"no GPTQModel environment at {GPTQ_VENV}: benchmarks/export_peers.py --setup-gptq")
    q = _quantized(tiny_dir, lowbit.RTN(bits=4, group_size=32, symmetric=False))
    out, _ = export(q, fmt, tmp_path / fmt)
    mine = _qmods(q.model)
    subprocess.run([python, "-c", _FOREIGN_PROBE, str(out), ",".join(mine)], check=True, capture_output=True)
    probe = torch.load(out / "probe.pt")
    if fmt == "gptq":
        assert set(probe["weights"]) == set(mine)
        for n, m in mine.items():
            assert torch.equal(probe["weights"][n], m.dequantized_weight(torch.float32).half()), n
    q.model.float()
    with torch.no_grad():
        a = q.model(IDS).logits
    assert (a - probe["logits"]).abs().max() <= 2**-7 * a.abs().max()


PEER_WORK = os.environ.get("LOWBIT_PEER_WORK", "/tmp/lowbit-peers")   # benchmarks/export_peers.py's outputs


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq", "smoothquant"])
def test_peer_checkpoint_loads(method):
    """llm-compressor's oneshot output (written by benchmarks/export_peers.py in its own environment) loads in
    lowbit, kept packed, and its logits on a held-out window match those of the peer's own loader
    (transformers + compressed-tensors, float32) up to lowbit's float16 scales."""
    out = os.path.join(PEER_WORK, f"llm-compressor-{method}")
    if not os.path.isfile(os.path.join(out, "peer_logits.pt")):
        pytest.skip(f"no llm-compressor {method} output in {PEER_WORK}: run benchmarks/export_peers.py")
    q = lowbit.load(out)
    assert _qmods(q.model)
    window = torch.load(os.path.join(PEER_WORK, "ids.pt"))["window"]
    theirs = torch.load(os.path.join(out, "peer_logits.pt"))
    with torch.no_grad():
        mine = q.model(window.unsqueeze(0)).logits[0].float()
    assert (mine - theirs).abs().max() <= 2**-6 * theirs.abs().max()
