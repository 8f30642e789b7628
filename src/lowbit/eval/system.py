"""Facts about the run: process memory, versions, machine."""

from __future__ import annotations

import functools
import os
import platform
import resource


def rss_bytes() -> int:
    """Current resident set size of this process."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def peak_rss_bytes() -> int:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if platform.system() == "Darwin" else 1024)


def environment() -> dict:
    import torch
    import transformers

    from .. import __version__
    cpu = (cpuinfo_fields() or {}).get("model name") or platform.processor() or platform.machine()
    generation = cpu_generation()
    if generation:
        cpu = f"{cpu} ({generation})"
    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_features": cpu_features(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


# the instruction-set extensions that decide which CPU kernel is fastest (a model name such as "Intel(R) Xeon(R)
# Processor" does not say which generation a machine is)
_FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16",
             "amx_int8", "amx_fp16")


def cpu_features() -> str:
    fields = cpuinfo_fields()
    if fields is None:
        return "unknown"
    flags = fields.get("flags", "").split()
    found = [f for f in _FEATURES if f in flags]
    if "amx_fp16" not in flags and half_matrix_unit():   # some kernels do not list it; the CPU reports it
        found.append("amx_fp16")
    return " ".join(found)


@functools.lru_cache(maxsize=1)
def _proc_cpuinfo() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return None


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str] | None:
    """Each key of /proc/cpuinfo (or of the text given) with its first value, the first processor's; None where
    the file cannot be read."""
    text = _proc_cpuinfo() if cpuinfo is None else cpuinfo
    if text is None:
        return None
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_generation(cpuinfo: str | None = None) -> str:
    """"family F, model M" as /proc/cpuinfo gives them (decimal), else "". Why: inside a virtual machine the model
    name is often only "AMD EPYC" or "Intel(R) Xeon(R) Processor", while the family and model still say which
    generation it is (AMD family 25 model 17 is a Zen 4 EPYC, which reads memory at less than half the rate of the
    Zen 5 one that carries the same name here: BENCHMARKS.md), and speed figures are only comparable within one."""
    fields = cpuinfo_fields(cpuinfo) or {}
    family, model = fields.get("cpu family", ""), fields.get("model", "")
    return f"family {family}, model {model}" if family.isdigit() and model.isdigit() else ""


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's vendor as /proc/cpuinfo names it ("GenuineIntel", "AuthenticAMD", ...), else "unknown"."""
    return (cpuinfo_fields() or {}).get("vendor_id", "unknown")


@functools.lru_cache(maxsize=1)
def half_matrix_unit() -> bool:
    """Whether this CPU multiplies float16 matrices in a matrix unit (AMX-FP16: about 10x its float32 rate on
    2 cores of an Intel Xeon with AMX, measured), as torch's CPU-feature probe reports it."""
    return _torch_cpu_reports("_is_amx_fp16_supported")


@functools.lru_cache(maxsize=1)
def bf16_dot_unit() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 dot products or AMX-BF16 tiles), as torch's
    CPU-feature probes report it: there oneDNN's bfloat16 products run at about 4x the float32 rate (2 cores of
    an AMD EPYC with AVX512-BF16: 914 against 206 GFLOP/s, measured)."""
    return _torch_cpu_reports("_is_avx512_bf16_supported") or bf16_matrix_unit()


@functools.lru_cache(maxsize=1)
def bf16_matrix_unit() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in a matrix unit (AMX-BF16 tiles), as torch's CPU-feature
    probe reports it. There oneDNN's "bfloat16 products" of float32 matrices round their inputs to bfloat16; with
    AVX512-BF16 alone it serves them with its float32 kernel (BENCHMARKS.md)."""
    return _torch_cpu_reports("_is_amx_tile_supported")


def _torch_cpu_reports(probe: str) -> bool:
    """What torch's CPU-feature probe `probe` (torch.cpu._is_..._supported) says; False where this torch has no
    such probe or it fails."""
    import torch
    fn = getattr(getattr(torch, "cpu", None), probe, None)
    try:
        return bool(fn()) if fn is not None else False
    except RuntimeError:
        return False


def memory_bandwidth(mib: int = 512, repeats: int = 7) -> dict:
    """Median GB/s of a large tensor copy (bytes read + bytes written) and of a sum (bytes read), with the
    threads torch uses."""
    import statistics
    import time

    import torch
    n = mib * 2**20 // 4
    src, dst = torch.rand(n), torch.empty(n)
    dst.copy_(src)
    copy_t, read_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        copy_t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        src.sum()
        read_t.append(time.perf_counter() - t0)
    nbytes = n * 4
    return {"copy_gb_s": 2 * nbytes / statistics.median(copy_t) / 1e9,
            "read_gb_s": nbytes / statistics.median(read_t) / 1e9, "buffer_mib": mib}
