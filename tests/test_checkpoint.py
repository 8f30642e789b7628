import pytest
import torch

import lowbit
from lowbit import LowbitError
from lowbit.eval import weight_stats
from lowbit.models.sources import base_of
from lowbit.nn import QuantLinear

from conftest import quantized


@pytest.mark.parametrize("bits,group,sym", [(8, -1, True), (4, 64, True), (4, -1, False), (4, 32, False)])
def test_save_load_logits_bit_identical(fresh, tokenizer, tmp_path, bits, group, sym):
    q = quantized(fresh, bits, group, sym)
    ids = torch.randint(0, 49152, (1, 40))
    with torch.no_grad():
        before = q(ids).logits
    lowbit.save_checkpoint(q, tokenizer, tmp_path / "ckpt", base="default")
    loaded = lowbit.load_checkpoint(tmp_path / "ckpt")
    with torch.no_grad():
        after = loaded.model(ids).logits
    assert torch.equal(before, after)
    assert loaded.model.lowbit["base"] == "default"
    assert base_of(tmp_path / "ckpt") == "default" and base_of("default") is None
    n = sum(isinstance(m, QuantLinear) for m in loaded.model.modules())
    assert n == 210


def test_mixed_recipe_with_quantized_lm_head_round_trips(fresh, tokenizer, tmp_path):
    rules = [{"match": "*.self_attn.*", "bits": 8, "group_size": -1}, {"match": "lm_head", "bits": 8, "group_size": -1}]
    q = quantized(fresh, 4, 64, False, recipe_rules=rules)
    assert isinstance(q.lm_head, QuantLinear)
    assert q.model.layers[3].self_attn.v_proj.spec.bits == 8
    assert q.model.layers[3].mlp.gate_proj.spec == lowbit.IntSpec(4, 64, False)
    ids = torch.randint(0, 49152, (1, 16))
    with torch.no_grad():
        before = q(ids).logits
    lowbit.save_checkpoint(q, tokenizer, tmp_path / "mixed")
    loaded = lowbit.load_checkpoint(tmp_path / "mixed").model
    with torch.no_grad():
        assert torch.equal(before, loaded(ids).logits)
    assert isinstance(loaded.lm_head, QuantLinear)
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_reference_kernel_checkpoint_matches_fast_kernel_closely(fresh, tokenizer, tmp_path):
    q = quantized(fresh, 4, 64, True)
    lowbit.save_checkpoint(q, tokenizer, tmp_path / "c")
    ref = lowbit.load_checkpoint(tmp_path / "c", kernel="reference").model
    assert ref.model.layers[0].mlp.up_proj.kernel.name == "reference"
    # real text: on random token ids the logits are nearly flat and their argmax flips on rounding noise
    ids = tokenizer("The default model's weights sit on a grid of four bits; quantizing them again with groups "
                    "of sixty-four columns costs a little", return_tensors="pt")["input_ids"]
    assert ids.shape[1] >= 16
    with torch.no_grad():
        a, b = q(ids).logits.float(), ref(ids).logits.float()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9
    assert ((a - b).norm() / b.norm()) < 0.05


def test_int4_weight_memory_at_most_35_percent_of_fp32(fresh):
    s = weight_stats(quantized(fresh, 4, 64, True))
    assert s["quantized_fp32_ratio"] <= 0.35
    assert s["quantized_bits_per_weight"] == pytest.approx(4.25)
    assert s["weights"] == 134_515_008


def test_failed_save_leaves_nothing(fresh, tmp_path):
    q = quantized(fresh, 8, -1, True)

    class Broken:
        def save_pretrained(self, path):
            raise OSError(28, "No space left on device")

    with pytest.raises(lowbit.LowbitError, match="No space left"):
        lowbit.save_checkpoint(q, Broken(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(fresh, tokenizer, tmp_path):
    q = quantized(fresh, 8, -1, True)
    (tmp_path / "out").mkdir()
    with pytest.raises(lowbit.LowbitError, match="already exists"):
        lowbit.save_checkpoint(q, tokenizer, tmp_path / "out")
    lowbit.save_checkpoint(q, tokenizer, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "lowbit.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(dtype="load"), "dtype 'load' is not one of"),
    (lambda r: r["modules"].update({"model.layers.0.nope": r["modules"]["model.layers.0.mlp.up_proj"]}),
     "names module 'model.layers.0.nope', which this model does not have"),
    (lambda r: r["modules"].update({"model.norm": r["modules"]["model.layers.0.mlp.up_proj"]}),
     "which is a .*RMSNorm, not a Linear"),
    (lambda r: r["modules"]["model.layers.0.mlp.up_proj"].update(kind="q9"), "unknown weight format kind 'q9'"),
    (lambda r: r["modules"]["model.layers.0.mlp.up_proj"].pop("bits"), "bad format for module"),
    (lambda r: r.update(modules=[1]), "'modules' must be a table"),
])
def test_crafted_metadata_is_one_clear_error(tiny_dir, tmp_path, edit, message):
    import json
    import lowbit
    loaded = lowbit.load_model(tiny_dir)
    lowbit.quantize(loaded.model, lowbit.RTN(bits=4, group_size=32), progress=False)
    ck = lowbit.save_checkpoint(loaded.model, loaded.tokenizer, tmp_path / "ck")
    record = json.loads((ck / "lowbit.json").read_text())
    edit(record)
    (ck / "lowbit.json").write_text(json.dumps(record))
    with pytest.raises(LowbitError, match=message):
        lowbit.load_checkpoint(ck)
