"""lowbit's native CPU kernels (csrc/*.cpp): built once from source with the system's C++ compiler, then loaded
as PyTorch operators (`torch.ops.lowbit.*`) that the compiled engine calls like any ATen op.

    python -m lowbit.kernels          # build (scripts/setup.sh runs this), or say why it cannot

The library goes to a cache directory keyed by the sources, the PyTorch version and the compiler
(`$LOWBIT_NATIVE_DIR`, default `~/.cache/lowbit/native`), so rebuilding happens only when one of them changes.
Nothing is built implicitly at run time: without the library the PyTorch kernels run, and `load()` says why.
One library serves every CPU: each kernel picks its instruction set (AVX-512 BF16, AVX-512, AVX2, portable)
when it runs, from what the CPU reports.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import torch

SOURCES = ("cpu_gemm.cpp", "column_moments.cpp", "decode_attention.cpp", "dense16.cpp", "gguf_search.cpp",
           "gptq_columns.cpp", "grid_errors.cpp")   # compiled; every file in csrc/ is part of the cache key
_CSRC = Path(__file__).with_name("csrc")


def _compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cxx and shutil.which(cxx):
            return shutil.which(cxx)
    return None


def library_path(cxx: str | None = None) -> Path:
    """Where the library for these sources, this PyTorch and this compiler lives (built or not)."""
    h = hashlib.sha256()
    for f in sorted(_CSRC.iterdir()):
        h.update(f.name.encode() + f.read_bytes())
    h.update(torch.__version__.encode())
    h.update(str(cxx or _compiler()).encode())
    root = Path(os.environ.get("LOWBIT_NATIVE_DIR") or Path.home() / ".cache" / "lowbit" / "native")
    return root / h.hexdigest()[:16] / "lowbit_native.so"


def build(verbose: bool = False) -> Path:
    """Compile the sources into the cache (a no-op when the library is there). Raises RuntimeError with the
    compiler's own message when it cannot."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    out = library_path(cxx)
    if out.exists():
        return out
    from torch.utils import cpp_extension
    out.parent.mkdir(parents=True, exist_ok=True)
    # -ffp-contract=off: no a·b + c contracted into one rounding (gguf_search reproduces float32 sums exactly)
    flags = ["-O3", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off",
             "-DTORCH_API_INCLUDE_EXTENSION_H",
             f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    libs = [f"-L{p}" for p in cpp_extension.library_paths()] + ["-lc10", "-ltorch", "-ltorch_cpu"]
    rpath = [f"-Wl,-rpath,{p}" for p in cpp_extension.library_paths()]
    # written beside the target and renamed into place: a killed build never leaves a library half-written
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so.tmp", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        cmd = [cxx, *flags, *includes, *(str(_CSRC / s) for s in SOURCES), "-o", str(partial), *libs, *rpath]
        r = subprocess.run(cmd, capture_output=not verbose, text=True)
        if r.returncode != 0:
            err = (r.stderr or "").strip().splitlines()
            first = next((line for line in err if "error" in line), err[0] if err else "failed")
            raise RuntimeError(f"compiling lowbit's native kernels failed: {first}")
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return out


@functools.lru_cache(maxsize=1)
def load() -> str | None:
    """Load the built library into torch.ops.lowbit; None when loaded, else the reason it is not."""
    if os.environ.get("LOWBIT_NATIVE", "1").strip() in ("0", ""):
        return "LOWBIT_NATIVE=0 turns lowbit's native kernels off"
    path = library_path()
    if not path.exists():
        return "lowbit's native kernels are not built (python -m lowbit.kernels builds them)"
    try:
        torch.ops.load_library(str(path))
    except OSError as e:
        return f"lowbit's native kernels did not load: {str(e)[:200]}"
    _register_fake()
    _tag_compile_caches(path)
    return None


def build_tag() -> str:
    """The loaded build's name (a hash of its sources, this PyTorch and the compiler), or "none" when the kernels
    are not loaded: compiled code that calls them is valid for that build only."""
    return _tag(library_path()) if load() is None else "none"


def _tag(path: Path) -> str:
    return f"lowbit-native-{path.parent.name}"


def _tag_compile_caches(path: Path) -> None:
    """torch.compile's on-disk graph caches key a compiled graph by its code and settings, not by the schemas of the
    custom ops it calls: a graph compiled against an older build of these kernels would call this one with that
    build's arguments (a crash, seen when an op gained arguments). The build's name, a hash of its sources, joins
    the cache key (torch.compiler.config.cache_key_tag, kept with any tag already set). torch keeps such settings
    per thread: they hold in the thread that loads the kernels and in threads run in a copy of its context (the
    engine compiles in the background so)."""
    tag = _tag(path)
    cfg = torch.compiler.config
    if tag not in cfg.cache_key_tag.split(","):
        cfg.cache_key_tag = ",".join(t for t in (cfg.cache_key_tag, tag) if t)


def available() -> bool:
    return load() is None


def serves(x: torch.Tensor) -> bool:
    """Whether the library's float32 routines (the GGUF searches, GPTQ's column loop) take tensors like x:
    float32 on the CPU, with the library loaded."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


@functools.lru_cache(maxsize=1)
def isa() -> int:
    """The instruction-set path the native kernels take on this CPU: 3 AVX-512 BF16, 2 AVX-512, 1 AVX2,
    0 portable."""
    return int(torch.ops.lowbit.cpu_isa())


def dense_dtype() -> torch.dtype:
    """The dtype the dense (many-row) paths multiply in: bfloat16 where the CPU has native bfloat16 arithmetic
    (the AVX-512 BF16 path; there a dense bfloat16 matmul is 3-5x a float32 one), float32 elsewhere."""
    return torch.bfloat16 if isa() == 3 else torch.float32


def q8() -> bool:
    """Whether the native kernels decode on int8 activations (int4_gemm_q8 / int8_gemm_q8: activations rounded to
    int8 per block, integer dot products): where the CPU has AVX-512 VNNI or AVX2 (q8_level), unless
    LOWBIT_NATIVE_Q8=0 asks for the float32 path (activations rounded to bfloat16 only). Process-wide: read
    whenever a native kernel packs weights, and every native layer follows the latest reading, so set it before
    loading or quantizing."""
    return os.environ.get("LOWBIT_NATIVE_Q8", "1") != "0" and q8_level() > 0


@functools.lru_cache(maxsize=1)
def q8_level() -> int:
    """The int8-activation decode this CPU runs: 2 AVX-512 VNNI (vpdpbusd), 1 AVX2 (vpmaddubsw pairs), 0 none."""
    return int(torch.ops.lowbit.cpu_q8())


@functools.lru_cache(maxsize=1)
def amx() -> bool:
    """Whether the dense paths multiply bfloat16 activations on AMX tiles of their own (csrc/cpu_gemm_amx.inc):
    the CPU has AMX-BF16, the operating system grants the tiles, and LOWBIT_NATIVE_AMX is not 0 (read once per
    process, when the library first multiplies or is asked)."""
    return bool(torch.ops.lowbit.cpu_amx())


Q8_NAMES = {2: "avx512-vnni", 1: "avx2", 0: "none"}


ISA_NAMES = {3: "avx512-bf16", 2: "avx512", 1: "avx2", 0: "portable"}


def _register_fake() -> None:
    """Output shapes for tracing (torch.compile): the kernels' results are [M, N], float32 but where a dense path
    multiplies activations in their own dtype."""
    for op in ("lowbit::int4_gemm", "lowbit::int8_gemm", "lowbit::int4_gemm_q8", "lowbit::int8_gemm_q8"):
        torch.library.register_fake(op)(_gemm_shape)
    torch.library.register_fake("lowbit::int4_dequant")(_dequant_shape)
    torch.library.register_fake("lowbit::int4_dense_linear")(_dense_shape)
    torch.library.register_fake("lowbit::int8_dense_linear")(_dense_shape)
    torch.library.register_fake("lowbit::int4pack_dense_linear")(_int4pack_dense_shape)
    torch.library.register_fake("lowbit::int8_unpack")(_unpack_shape)
    torch.library.register_fake("lowbit::decode_attention")(_attention_shape)
    torch.library.register_fake("lowbit::dense16_linear")(_dense16_shape)


def _gemm_shape(x, w, *_args):   # the scales, offsets, group size (isa) and super-block scales
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.float32)


def _dense_shape(x, wpack, scales, offsets, group_size, dtype, *_supers):
    # in the matmul's dtype where the activations are in it (csrc/cpu_gemm.cpp, tiled_linear), else float32
    return x.new_empty((x.shape[0], wpack.shape[0]), dtype=x.dtype if x.dtype == dtype else torch.float32)


def _int4pack_dense_shape(x, wpack, scale_zeros, group_size, dtype, block_rows):
    return x.new_empty((x.shape[0], wpack.shape[0]), dtype=x.dtype if x.dtype == dtype else torch.float32)


def _unpack_shape(wq, K, isa=-1):
    return wq.new_empty((wq.shape[0], K), dtype=torch.int8)


def _attention_shape(q, keys, values, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _dense16_shape(x, weight, bias=None, isa=-1):
    return x.new_empty((x.shape[0], weight.shape[0]))


def _dequant_shape(wpack, scales, offsets, group_size, dtype, *_supers):
    return wpack.new_empty((wpack.shape[0], wpack.shape[1] * 2), dtype=dtype)


def main() -> int:
    try:
        path = build(verbose="-v" in sys.argv)
    except RuntimeError as e:
        print(f"lowbit: {e}; the PyTorch kernels will be used instead", file=sys.stderr)
        return 1
    reason = load()
    if reason:
        print(f"lowbit: {reason}", file=sys.stderr)
        return 1
    tiles = ", with AMX tiles for many rows" if amx() else ""
    print(f"lowbit native kernels: {path.name} built; this CPU offers the {ISA_NAMES[isa()]} path{tiles}")
    return 0
