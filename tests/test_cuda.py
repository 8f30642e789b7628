"""The engine and the quantized Linears on a CUDA GPU: the engine's choices there (PyTorch's attention and
matmuls, not the CPU kernels), its tokens against transformers' generate, and the Triton W4A16 kernel inside a
model. Skipped where no GPU is present (the default CI machine); run on a GPU machine with
`pytest -p no:xdist tests/test_cuda.py`."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from lowbit import IntSpec, LowbitError  # noqa: E402
from lowbit.engine.decoder import NativeDense  # noqa: E402
from lowbit.engine.generate import Engine  # noqa: E402
from test_engine import _tiny_model, reference_tokens  # noqa: E402


def _on_gpu(dtype):
    return _tiny_model("llama").to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("compile", [False, True])
def test_engine_on_the_gpu_decodes_transformers_tokens(dtype, compile):
    model = _on_gpu(dtype)
    ids = torch.randint(3, 256, (1, 7), generator=torch.Generator().manual_seed(0)).cuda()
    engine = Engine(model, compile=compile)
    d = engine.decoder
    # the CPU kernels are not chosen on a GPU: the model's own attention and Linears run there
    assert not any(b.native_attention for b in d.blocks) and not isinstance(d.lm_head, NativeDense)
    got = engine.generate(ids, 24)["tokens"]
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), reference_tokens(model, ids, 24).cpu())


def test_asking_for_the_cpu_kernels_on_a_gpu_says_why_in_one_line():
    model = _on_gpu(torch.bfloat16)
    for option in ("attention", "dense"):
        with pytest.raises(LowbitError, match=f"{option}='native' is not available here: .*not cuda"):
            Engine(model, compile=False, **{option: "native"})


def test_int4_model_on_the_triton_kernel_decodes_close_to_its_reference_kernel():
    """INT4 g64 weights on the GPU run the Triton W4A16 kernel; the same codes on the reference kernel
    (dequantize, then matmul) give each decoded token's logits within float16 rounding."""
    import copy

    import lowbit
    base = _tiny_model("llama").to("cuda", torch.float16)   # quantized on the GPU: kernels are chosen there
    models = {k: lowbit.quantize(copy.deepcopy(base), lowbit.Recipe.default(
        lowbit.config_for("rtn", IntSpec(4, 64, True), kernel=k)), progress=False) for k in ("auto", "reference")}
    kernels = {m.kernel.name for m in models["auto"].modules() if hasattr(m, "kernel")}
    assert kernels == {"triton-w4a16"}, kernels
    ids = torch.randint(3, 256, (1, 24), generator=torch.Generator().manual_seed(1)).cuda()
    engines = {k: Engine(m, compile=False) for k, m in models.items()}
    with torch.no_grad():
        for e in engines.values():
            e.reserve(24)
            e.prefill(ids[:, :4])
        for t in range(4, 24):
            got, want = (engines[k].decode(ids[:, t:t + 1], t)[0].float() for k in ("auto", "reference"))
            assert (got - want).abs().max() <= 0.01 * want.abs().max() + 0.01, t
