import pytest
import json
import shutil
import subprocess
import sys

from safetensors.torch import load_file, save_file

from lowbit.cli import main
from lowbit.models.sources import default_model_path

from conftest import copy_dir, edit_config


def run(capsys, *argv):
    code = main(["--quiet", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_line_error(code, err, pattern):
    import re
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    assert re.search(pattern, lines[0]), lines[0]


def test_quantize_eval_generate_end_to_end(capsys, tmp_path):
    out = tmp_path / "w4"
    code, stdout, _ = run(capsys, "quantize", "default", "--bits", "4", "--group-size", "64", "--asym", "--out", out)
    assert code == 0 and "210 Linear" in stdout
    record = json.loads((out / "lowbit.json").read_text())
    assert record["modules"]["model.layers.0.mlp.up_proj"]["bits"] == 4
    assert record["base"] == "default" and record["torch_version"]
    code, stdout, _ = run(capsys, "eval", out, "--max-windows", "2", "--ctx", "128", "--json", tmp_path / "r.json",
                          "--engine", "eager")
    assert code == 0 and "perplexity" in stdout
    r = json.loads((tmp_path / "r.json").read_text())
    assert {"ppl", "kld", "top1", "bytes", "bits_per_weight", "seconds"} <= set(r)
    assert 0 < r["kld"] < 1 and 0.5 < r["top1"] < 1 and r["ppl"] > 1
    code, stdout, err = run(capsys, "generate", out, "--prompt", "Python is", "--max-new-tokens", "5", "--engine", "eager")
    assert code == 0 and stdout.strip() and "tok/s" in err


def test_console_script_entry_point(tmp_path):
    exe = shutil.which("lowbit", path=str(__import__("pathlib").Path(sys.executable).parent))
    r = subprocess.run([exe, "quantize", "default", "--group-size", "100", "--out", tmp_path / "x"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "group size 100 does not divide" in r.stderr
    assert not (tmp_path / "x").exists()


def test_recipe_option(capsys, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[[rule]]\nmatch = "*.self_attn.*"\nbits = 8\ngroup_size = -1\n')
    code, stdout, _ = run(capsys, "quantize", "default", "--recipe", recipe, "--out", tmp_path / "m")
    assert code == 0 and "int8_pc_sym x120" in stdout and "int4_g64_sym x90" in stdout


# --- bad input: one clear line, exit 2, nothing written ---------------------------------------------------

def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "model not found")
    assert not (tmp_path / "o").exists()


def test_corrupt_config(capsys, tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    (d / "config.json").write_text("{ not json")
    code, _, err = run(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "corrupt config.json")
    assert not (tmp_path / "o").exists()


def test_unknown_architecture(capsys, tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    edit_config(d, model_type="gpt2")
    code, _, err = run(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unsupported architecture 'gpt2'")


def test_truncated_safetensors(capsys, tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    code, _, err = run(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "corrupt or truncated safetensors")
    assert not (tmp_path / "o").exists()


def test_truncated_gguf(capsys, tmp_path):
    g = tmp_path / "cut.gguf"
    with open(default_model_path(), "rb") as f:
        g.write_bytes(f.read(20_000_000))
    code, _, err = run(capsys, "quantize", g, "--out", tmp_path / "o")
    assert_one_line_error(code, err, "corrupt or truncated GGUF")
    assert not (tmp_path / "o").exists()


def test_not_a_model_file(capsys, tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello")
    code, _, err = run(capsys, "eval", f)
    assert_one_line_error(code, err, "not a model")


def test_nan_in_weights(capsys, tmp_path, tiny_dir):
    d = copy_dir(tiny_dir, tmp_path / "m")
    sd = load_file(str(d / "model.safetensors"))
    key = next(k for k in sd if k.endswith("mlp.up_proj.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    code, _, err = run(capsys, "quantize", d, "--out", tmp_path / "o")
    assert_one_line_error(code, err, f"weight {key} contains NaN or Inf")
    assert not (tmp_path / "o").exists()


def test_group_size_that_does_not_divide(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "default", "--group-size", "128", "--out", tmp_path / "o")
    assert_one_line_error(code, err, r"group size 128 does not divide in_features=576 .*32, 64, -1")
    assert not (tmp_path / "o").exists()


def test_empty_text_file(capsys, tmp_path):
    t = tmp_path / "empty.txt"
    t.write_text("  \n")
    code, _, err = run(capsys, "eval", "default", "--text", t, "--json", tmp_path / "r.json", "--no-speed")
    assert_one_line_error(code, err, "text file is empty")
    assert not (tmp_path / "r.json").exists()


def test_corrupt_checkpoint(capsys, tmp_path, fresh, tokenizer):
    import lowbit
    from conftest import quantized
    ck = tmp_path / "ck"
    lowbit.save_checkpoint(quantized(fresh, 8, -1, True), tokenizer, ck)
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    code, _, err = run(capsys, "eval", ck, "--no-speed")
    assert_one_line_error(code, err, "corrupt or truncated safetensors")
    (ck / "lowbit.json").write_text("{")
    code, _, err = run(capsys, "generate", ck, "--prompt", "x")
    assert_one_line_error(code, err, "corrupt lowbit.json")


def test_tiny_hf_directory_works(capsys, tmp_path, tiny_dir):
    code, _, _ = run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "--out", tmp_path / "t")
    assert code == 0
    code, stdout, _ = run(capsys, "eval", tmp_path / "t", "--ctx", "32", "--max-windows", "2", "--no-speed")
    assert code == 0 and "KLD vs base" in stdout


def test_eval_on_a_text_file(capsys, tmp_path):
    from lowbit.data import pydoc_text
    t = tmp_path / "prose.txt"
    t.write_text(pydoc_text()[:20000])
    code, stdout, _ = run(capsys, "eval", "default", "--text", t, "--ctx", "128", "--max-windows", "2", "--no-speed",
                          "--json", tmp_path / "r.json")
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["windows"] == 2 and r["text"] == str(t) and r["ppl"] > 1


def test_eval_of_a_gguf_file_reports_the_file_size(capsys, tmp_path):
    """transformers loads a GGUF dequantized to float; the report still gives the file's own bits per weight."""
    import os
    path = default_model_path()
    code, stdout, _ = run(capsys, "eval", path, "--ctx", "64", "--max-windows", "1", "--no-speed",
                          "--json", tmp_path / "r.json")
    assert code == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["bits_per_weight"] == 32.0   # what ran: float32
    assert r["file_bytes"] == os.path.getsize(path)
    assert r["file_bits_per_weight"] == pytest.approx(8 * os.path.getsize(path) / r["weights"])
    assert 4.5 < r["file_bits_per_weight"] < 6   # Q4_1 blocks and a Q8_0 embedding
    assert f"{r['file_bits_per_weight']:.3f} bits/weight (loaded dequantized to float)" in stdout


def test_generate_streams_tokens_while_the_step_compiles(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", tiny_dir, "--prompt", "Python is", "--max-new-tokens", "6")
    assert code == 0 and out.strip()
    assert "first after" in err and "eager while the step compiled" in err
    import lowbit
    loaded = lowbit.load(tiny_dir)
    want = lowbit.generate(loaded.model, loaded.tokenizer, "Python is", 6, engine="eager")["text"]
    assert out.rstrip("\n") == want
    code, out2, err = run(capsys, "generate", tiny_dir, "--prompt", "Python is", "--max-new-tokens", "6",
                          "--wait-compile")
    assert code == 0 and out2 == out and "aot engine" in err   # --engine auto on a CPU


def test_generate_reference_kernels_are_transformers_on_a_bfloat16_checkpoint(capsys, tiny_dir, tmp_path):
    out = tmp_path / "w4"
    code, _, _ = run(capsys, "quantize", tiny_dir, "--bits", "4", "--group-size", "32", "--out", out)
    assert code == 0   # bfloat16 activations and cache (lowbit quantize's default dtype)
    args = ["generate", out, "--prompt", "Python is", "--max-new-tokens", "8"]
    code, want, _ = run(capsys, *args, "--engine", "hf")
    assert code == 0 and want.strip()
    code, got, err = run(capsys, *args, "--engine", "eager", "--attention", "reference", "--dense", "reference")
    assert code == 0 and got.strip() == want.strip() and "eager engine" in err
    code, got, err = run(capsys, *args, "--engine", "eager", "--attention", "native", "--dense", "native")
    assert code == 0 and got.strip() and "eager engine" in err


def test_generate_kv_cache_options(capsys, tiny_dir):
    code, out, err = run(capsys, "generate", tiny_dir, "--prompt", "Python is", "--max-new-tokens", "4",
                         "--kv-bits", "4", "--engine", "eager")
    assert code == 0 and "tok/s" in err
    code, _, err = run(capsys, "generate", tiny_dir, "--prompt", "x", "--kv-keys", "channel")
    assert_one_line_error(code, err, "per-channel keys need a quantized KV cache")
    code, out, err = run(capsys, "generate", tiny_dir, "--prompt", "Python is", "--max-new-tokens", "4",
                         "--kv-bits", "4", "--kv-offload")
    assert code == 0 and "eager engine" in err


def test_os_errors_and_unexpected_errors_are_one_line(capsys, tmp_path, monkeypatch):
    import lowbit.cli as cli
    def disk_full(args):
        raise OSError(28, "No space left on device", str(tmp_path / "out"))
    monkeypatch.setattr(cli, "cmd_eval", disk_full)
    code, _, err = run(capsys, "eval", "default")
    assert_one_line_error(code, err, "No space left on device: .*out")

    def bug(args):
        raise KeyError("oops")
    monkeypatch.setattr(cli, "cmd_eval", bug)
    code, _, err = run(capsys, "eval", "default")
    assert_one_line_error(code, err, "unexpected KeyError.*a bug in lowbit.*--debug")
    code, _, err = run(capsys, "--debug", "eval", "default")
    assert code == 2 and "Traceback" in err and err.strip().splitlines()[-1].startswith("lowbit: error: unexpected")


def test_generation_length_is_checked_on_every_engine(capsys, tiny_dir):
    for engine in ("eager", "hf"):
        code, _, err = run(capsys, "generate", tiny_dir, "--prompt", "hi", "--max-new-tokens", "100000",
                           "--engine", engine)
        assert_one_line_error(code, err, "exceed the model's .* positions")


def test_an_option_of_another_method_is_refused_not_ignored(capsys, tmp_path):
    code, _, err = run(capsys, "quantize", "default", "--method", "rtn", "--damp", "0.1", "--no-clip",
                       "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--damp, --no-clip do not apply to --method rtn")
    assert not (tmp_path / "o").exists()


def test_output_problems_are_reported_before_any_work(capsys, tmp_path, monkeypatch):
    import lowbit.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --out"))
    (tmp_path / "exists").mkdir()
    code, _, err = run(capsys, "quantize", "default", "--out", tmp_path / "exists")
    assert_one_line_error(code, err, "already exists .*--overwrite")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, "quantize", "default", "--out", blocker / "sub" / "out")
    assert_one_line_error(code, err, "is not a writable directory")


def test_argument_errors_are_one_line(capsys):
    import pytest as _pytest
    for argv, pattern in [(["quantize", "default", "--bits", "9", "--out", "x"], "quantize: argument --bits: invalid choice"),
                          (["eval"], "eval: the following arguments are required: model"),
                          (["frobnicate"], "invalid choice: 'frobnicate'"),
                          (["generate", "m", "--prompt", "p", "--max-new-tokens", "0"], "must be positive")]:
        with _pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err
        assert_one_line_error(e.value.code, err, pattern)


def test_a_tokenizer_beyond_the_models_vocabulary_is_one_error(capsys, tmp_path, tiny_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=100, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "m")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(tmp_path / "m")
    capsys.readouterr()
    for argv in (["generate", tmp_path / "m", "--prompt", "Python is", "--engine", "eager"],
                 ["eval", tmp_path / "m", "--max-windows", "1", "--ctx", "16", "--no-speed"]):
        code, _, err = run(capsys, *argv)
        assert_one_line_error(code, err, "beyond the model's vocabulary of 100")


def test_eval_json_to_an_unwritable_place_fails_before_evaluating(capsys, tmp_path, monkeypatch):
    import lowbit.models as models
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model before checking --json"))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, "eval", "default", "--json", blocker / "r.json")
    assert_one_line_error(code, err, "is not a writable directory")
