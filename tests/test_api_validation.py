"""Wrong-typed or wrong-valued calls to the public functions fail at the boundary with one clear message."""

import pytest
import torch

import lowbit
from lowbit import LowbitError


@pytest.fixture(scope="module")
def small(tiny_dir):
    return lowbit.load(tiny_dir)


@pytest.mark.parametrize("call, message", [
    (lambda s: lowbit.load(123), "a model source is"),
    (lambda s: lowbit.load("/nonexistent/model"), "model not found"),
    (lambda s: lowbit.quantize(s.model, "gptq"), "config must be a quantization configuration"),
    (lambda s: lowbit.quantize(42, lowbit.RTN()), "quantize takes a torch model"),
    (lambda s: lowbit.quantize(s.model, lowbit.RTN(), dtype="bf16"), "dtype must be a torch floating-point dtype"),
    (lambda s: lowbit.quantize(s.model, lowbit.GPTQ(group_size=32), calibration=torch.zeros(2, 8)), "LongTensor"),
    (lambda s: lowbit.quantize(s.model, lowbit.GPTQ(group_size=32), tokenizer=s.tokenizer, calib_samples=0),
     "calibration samples must be a positive integer"),
    (lambda s: lowbit.evaluate(s, max_windows=0), "max_windows must be a positive integer"),
    (lambda s: lowbit.evaluate(s, ctx="512"), "context length must be an integer"),
    (lambda s: lowbit.evaluate(s, ctx=1), "context length must be an integer of at least 2"),
    (lambda s: lowbit.evaluate(s, text=3.5), "a text source is"),
    (lambda s: lowbit.evaluate(s.model), "needs the model's tokenizer"),
    (lambda s: lowbit.generate(s.model, s.tokenizer, "hi", max_new_tokens=0), "max_new_tokens must be a positive"),
    (lambda s: lowbit.generate(s.model, s.tokenizer, "hi", max_new_tokens=True), "max_new_tokens must be a positive"),
    (lambda s: lowbit.generate(s.model, s.tokenizer, "hi", engine="fast"), "unknown engine 'fast'"),
    (lambda s: lowbit.generate(s.model, s.tokenizer, None), "prompt must be a string"),
    (lambda s: lowbit.compare(s.source, ["rtn"], "/tmp/never-written"), "quantization configurations"),
    (lambda s: lowbit.save(s.model, "/tmp/never-written"), "needs the model's tokenizer"),
    (lambda s: lowbit.IntSpec(group_size=64.5), "group size must be an integer"),
    (lambda s: lowbit.IntSpec(bits="4"), "bits must be an integer, got '4'"),
    (lambda s: lowbit.GPTQ(act_ordr=True), "unexpected keyword"),
])
def test_bad_calls_fail_clearly(small, call, message):
    with pytest.raises((LowbitError, TypeError), match=message):
        call(small)
