import pytest
import torch

import lowbit
from lowbit.data import load_text, pydoc_split, pydoc_text
from lowbit.models.sources import default_model_path


@pytest.mark.slow
def test_gguf_load_without_cache_equals_cached(default_loaded):
    fresh = lowbit.load_model(default_model_path(), cache=False)
    cached = default_loaded
    for name, p in fresh.model.state_dict().items():
        assert torch.equal(p, cached.model.state_dict()[name]), name
    text = load_text(None, "evaluation")[:5000]
    assert fresh.tokenizer(text)["input_ids"] == cached.tokenizer(text)["input_ids"]
    assert fresh.model.config.num_hidden_layers == 30 and fresh.model.config.hidden_size == 576
    # a first (uncached) load is a plain float model like a cached one: casts and saving are not refused
    assert getattr(fresh.model, "hf_quantizer", None) is None
    fresh.model.float()
    fresh.model.to(torch.bfloat16)


def test_default_text_split_is_deterministic_and_disjoint():
    calib, held_out = pydoc_split()
    text = pydoc_text()
    assert len(text) > 400_000
    assert calib + "\n\n" + held_out == text
    assert abs(len(calib) - len(held_out)) < 0.01 * len(text)
    assert load_text(None, "calibration") == calib and load_text("pydoc", "evaluation") == held_out
