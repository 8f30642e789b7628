import torch

from lowbit.data import calibration_samples, load_text
from lowbit.models.calibration import capture_block_inputs, iterate_blocks


def test_block_by_block_equals_full_forward(base, tokenizer):
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=2, seqlen=64, seed=0)
    with torch.no_grad():
        full = base(samples, output_hidden_states=True, use_cache=False).hidden_states
    last = None
    for i, block, inputs in iterate_blocks(base, samples):
        assert len(inputs.hidden) == 2
        got = torch.cat(inputs.hidden)
        torch.testing.assert_close(got, full[i], rtol=1e-5, atol=1e-5)  # inputs of block i
        last = (block, inputs)
    from lowbit.models.calibration import run_block
    out = torch.cat(run_block(*last).hidden)
    with torch.no_grad():
        logits = base.lm_head(base.model.norm(out))
        ref = base(samples, use_cache=False).logits
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4)


def test_capture_is_deterministic_and_stops_at_first_block(base, tokenizer):
    text = load_text(None, "calibration")
    a = calibration_samples(tokenizer, text, n=3, seqlen=32, seed=7)
    b = calibration_samples(tokenizer, text, n=3, seqlen=32, seed=7)
    assert torch.equal(a, b)
    inputs = capture_block_inputs(base, a)
    assert [tuple(h.shape) for h in inputs.hidden] == [(1, 32, 576)] * 3
    torch.testing.assert_close(inputs.hidden[0][0], base.model.embed_tokens(a[0]))


def test_calibration_in_every_accepted_form(tokenizer, tmp_path):
    import pytest
    from lowbit import LowbitError
    from lowbit.data import calibration_ids
    docs = [f"Document {i}: the interpreter reads source code, compiles it and runs the byte code." * 8 for i in range(6)]
    ids = torch.randint(0, 49152, (3, 16))
    assert calibration_ids(ids) is ids                                          # token ids: used as given
    from_list = calibration_ids(docs, tokenizer, n=4, seqlen=32, seed=1)
    from_records = calibration_ids([{"text": d} for d in docs], tokenizer, n=4, seqlen=32, seed=1)   # a dataset's rows
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(docs))
    from_file = calibration_ids(str(path), tokenizer, n=4, seqlen=32, seed=1)
    assert from_list.shape == (4, 32) and torch.equal(from_list, from_records) and torch.equal(from_list, from_file)
    default = calibration_ids(None, tokenizer, n=2, seqlen=64)
    assert torch.equal(default, calibration_samples(tokenizer, load_text(None, "calibration"), 2, 64, 0))
    for bad, message in [(ids.float(), "LongTensor"), (docs, "needs a tokenizer"), ([3, 4], "strings or records"),
                         (42, "token ids, a text source"), ([""], "empty")]:
        with pytest.raises(LowbitError, match=message):
            calibration_ids(bad, None if message == "needs a tokenizer" else tokenizer, n=2, seqlen=16)
    with pytest.raises(LowbitError, match="calibration samples must be a positive integer"):
        calibration_ids(docs, tokenizer, n=0, seqlen=16)


def test_input_summary_keeps_what_the_searches_read(tiny_dir):
    """summarize_inputs against the inputs capture_calls keeps in full: same statistics, the clip search's
    token subsample, the first calls."""
    import lowbit
    from lowbit.algorithms import search_clip
    from lowbit.models.calibration import capture_calls, first_input, summarize_inputs
    model = lowbit.load_model(tiny_dir).model
    samples = torch.randint(0, 1000, (4, 256))                 # 1024 tokens: 512 times a power of two
    inputs = capture_block_inputs(model, samples)
    block = model.model.layers[0]
    names = {"self_attn": 64, "mlp.down_proj": 128}
    full = capture_calls(block, inputs, list(names))
    summary = summarize_inputs(block, inputs, names, keep=2, n_tokens=512)
    for name, K in names.items():
        X = torch.cat([first_input(block.get_submodule(name), a, kw).reshape(-1, K) for a, kw in full[name]]).float()
        S = summary[name]
        assert S.tokens == X.shape[0] == 1024
        torch.testing.assert_close(S.abs_mean, X.abs().mean(0), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(S.sq_mean, X.pow(2).mean(0), rtol=1e-5, atol=1e-7)
        assert S.sample.shape[0] <= 1024 and torch.equal(S.sample[::S.sample.shape[0] // 512][:512], X[::2][:512])
        assert len(S.calls) == 2 and all(torch.equal(first_input(block.get_submodule(name), *c),
                                                     first_input(block.get_submodule(name), *f))
                                         for c, f in zip(S.calls, full[name]))
    W = block.mlp.down_proj.weight.detach()
    spec = lowbit.IntSpec(3, 32, False)
    X = torch.cat([first_input(block.mlp.down_proj, a, kw).reshape(-1, 128) for a, kw in full["mlp.down_proj"]])
    assert torch.equal(search_clip(W, summary["mlp.down_proj"].sample, spec), search_clip(W, X, spec))


def test_input_summary_sample_spreads_over_any_token_count():
    from lowbit.models.calibration import BlockInputs, summarize_inputs

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(1, 1)

        def forward(self, h):
            return self.lin(h)

    hidden, start = [], 0
    for n in (5, 7, 3, 11, 9, 2):                       # 37 tokens in uneven calls, rows numbered
        hidden.append(torch.arange(start, start + n, dtype=torch.float32).reshape(1, n, 1))
        start += n
    S = summarize_inputs(Block(), BlockInputs(hidden, [{}] * len(hidden)), {"lin": 1}, keep=0, n_tokens=8)["lin"]
    assert S.tokens == 37 and S.calls == []
    assert torch.equal(S.sample.squeeze(1), torch.arange(0, 37, 4, dtype=torch.float32))   # 10 rows <= 16
    torch.testing.assert_close(S.abs_mean, torch.tensor([18.0]))


def test_release_freed_memory_returns_heap_pages_to_the_os():
    # Tensors of a few MB come from glibc's heap once its mmap threshold has risen: freeing them keeps their
    # pages resident until release_freed_memory trims the heap (what keeps AWQ's calibration peak down).
    import ctypes
    import pathlib
    import pytest
    from lowbit.heap import release_freed_memory
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        pytest.skip("not glibc")

    def rss_mib():
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    M_MMAP_THRESHOLD = -3
    assert mallopt(M_MMAP_THRESHOLD, 64 << 20)        # as after freeing large blocks: 2 MB tensors on the heap
    try:
        big = [torch.ones(512 * 1024) for _ in range(100)]   # 100 x 2 MiB, touched
        keep = big[1::2]   # every other one stays: the freed ones are holes the heap cannot shrink past
        del big
        before = rss_mib()
        release_freed_memory(collect=False)
        assert before - rss_mib() > 80, "freed heap pages were not returned"
        assert all(float(k[-1]) == 1 for k in keep)
    finally:
        mallopt(M_MMAP_THRESHOLD, 128 * 1024)


def test_column_moments_native_equals_tensor_code_on_real_inputs(base, tokenizer, monkeypatch):
    # AWQ's input statistics: the native op reads each window once; the means AWQ reads (float32) must be the
    # tensor code's, bit for bit, on real activations of every group's inputs (wide and narrow, heavy-tailed)
    import pytest
    from lowbit.kernels import native
    from lowbit.models import calibration
    if not native.available():
        pytest.skip("native kernels not built")
    samples = calibration_samples(tokenizer, load_text(None, "calibration"), n=2, seqlen=256, seed=0)
    names = ["self_attn", "self_attn.o_proj", "mlp", "mlp.down_proj"]
    for i, block, inputs in iterate_blocks(base, samples):
        if i not in (0, 7, 29):
            continue
        calls = calibration.capture_calls(block, inputs, names)
        for name in names:
            mod = block.get_submodule(name)
            xs = [calibration.first_input(mod, a, kw) for a, kw in calls[name]]
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]).float()
            got = calibration.column_moments(x)
            monkeypatch.setattr(native, "serves", lambda t: False)
            want = calibration.column_moments(x)
            monkeypatch.undo()
            assert torch.equal(got[0], want[0]), name                        # |x| sums: exact in float64
            torch.testing.assert_close(got[1], want[1], rtol=1e-15, atol=0)  # x² sums: the last bit at most
            n = x.shape[0]
            assert torch.equal((got[1] / n).float(), (want[1] / n).float()), name
    x = torch.randn(37, 130)   # a column count that is not a multiple of the op's 64-column chunks
    assert torch.equal(calibration.column_moments(x)[0], x.abs().sum(0, dtype=torch.float64))
