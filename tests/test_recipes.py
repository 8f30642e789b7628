import json

import pytest

from lowbit import IntSpec, LowbitError, Recipe, Rule, Scheme

W4 = Scheme("rtn", IntSpec(4, 64, True))
W8 = Scheme("rtn", IntSpec(8, -1, True))


def test_first_matching_rule_wins_and_unmatched_is_kept():
    r = Recipe([Rule("*.mlp.*", W4), Rule("re:.*layers\\.[0-9]\\..*", W8)])
    assert r.scheme_for("model.layers.3.mlp.up_proj") is W4
    assert r.scheme_for("model.layers.3.self_attn.q_proj") is W8
    assert r.scheme_for("model.layers.13.self_attn.q_proj") is None
    assert r.scheme_for("lm_head") is None


def test_default_recipe_plan_on_default_model(base):
    plan = Recipe.default(W4).plan(base)
    assert len(plan) == 30 * 7
    assert "lm_head" not in plan
    assert all(n.startswith("model.layers.") for n in plan)


def test_attention_int8_mlp_int4_from_toml(tmp_path, base):
    f = tmp_path / "mix.toml"
    f.write_text('[[rule]]\nmatch = "model.layers.0.mlp.*"\nkeep = true\n\n'
                 '[[rule]]\nmatch = "*.self_attn.*"\nbits = 8\ngroup_size = -1\n\n'
                 '[[rule]]\nmatch = "*.mlp.*"\nsymmetric = false\n\n'
                 '[[rule]]\nmatch = "model.layers.1.*"\nkeep = true\n')
    plan = Recipe.from_file(f, W4).plan(base)
    assert plan["model.layers.1.self_attn.o_proj"].spec == IntSpec(8, -1, True)
    assert plan["model.layers.1.mlp.down_proj"].spec == IntSpec(4, 64, False)  # unspecified fields: CLI scheme
    assert "model.layers.0.mlp.down_proj" not in plan  # kept: its rule comes first
    assert "model.layers.0.self_attn.q_proj" in plan
    assert "model.layers.1.mlp.up_proj" in plan  # the later keep rule never applies: the mlp rule matched first


def test_json_recipe_and_quantized_lm_head(tmp_path, base):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"rules": [{"match": "lm_head", "bits": 8, "group_size": -1}]}))
    plan = Recipe.from_file(f, W4).plan(base)
    assert plan["lm_head"].spec.bits == 8 and plan["model.layers.5.mlp.up_proj"].spec.bits == 4


def test_recipe_errors(tmp_path, base):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rules": [{"match": "*", "bitz": 4}]}))
    with pytest.raises(LowbitError, match="unknown keys"):
        Recipe.from_file(bad, W4)
    with pytest.raises(LowbitError, match="not found"):
        Recipe.from_file(tmp_path / "missing.toml", W4)
    with pytest.raises(LowbitError, match="group size 128 does not divide"):
        Recipe.default(Scheme("rtn", IntSpec(4, 128, True))).plan(base)
    with pytest.raises(LowbitError, match="unknown method"):
        Scheme("magic", IntSpec())
    with pytest.raises(LowbitError, match="quantizes no Linear"):
        Recipe([Rule("*", None)]).plan(base)
