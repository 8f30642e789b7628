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
