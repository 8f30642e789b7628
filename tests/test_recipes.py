import json

import pytest

from lowbit import GPTQ, RTN, IntSpec, LowbitError, Recipe, Rule, config_for

W4 = RTN(bits=4, group_size=64)
W8 = RTN(bits=8, group_size=-1)


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
        Recipe.default(RTN(bits=4, group_size=128)).plan(base)
    with pytest.raises(LowbitError, match="unknown method"):
        config_for("magic", IntSpec())
    with pytest.raises(LowbitError, match="quantizes no Linear"):
        Recipe([Rule("*", None)]).plan(base)


@pytest.mark.parametrize("rule, message", [
    ({"match": "re:(unclosed"}, "invalid regular expression"),
    ({"match": 3}, "'match' must be a non-empty string"),
    ({"match": "x" * 2000}, "longer than"),
    ({"match": "*", "bits": "4"}, "bits must be an integer, got '4'"),
    ({"match": "*", "bits": 4.5}, "bits must be an integer"),
    ({"match": "*", "group_size": 64.5}, "group size must be an integer"),
    ({"match": "*", "options": [1]}, "'options' must be a table"),
    ({"match": "*", "method": "gptq", "options": {"act_ordr": True}}, "unknown option.*act_ordr.*valid: .*act_order"),
    ({"match": "*", "method": 7}, "'method' must be a string"),
])
def test_bad_rules_give_one_clear_error(rule, message):
    with pytest.raises(LowbitError, match=message) as e:
        Recipe.from_rules([rule], W4, where="r.toml")
    assert str(e.value).startswith("r.toml: rule 1")


def test_rule_options_merge_over_the_base_configuration():
    base = GPTQ(bits=4, group_size=64, damp=0.05)
    r = Recipe.from_rules([{"match": "*.mlp.*", "options": {"act_order": True}},
                           {"match": "*.self_attn.*", "method": "rtn", "bits": 8, "group_size": -1}], base)
    mlp = r.scheme_for("model.layers.0.mlp.up_proj")
    assert mlp == GPTQ(bits=4, group_size=64, damp=0.05, act_order=True)
    assert r.scheme_for("model.layers.0.self_attn.q_proj") == RTN(bits=8, group_size=-1)
    assert r.scheme_for("model.layers.0.other") == base          # the default rule: the base configuration
    assert Recipe.from_rules(r.to_list()[:2], base).rules[:2] == r.rules[:2]   # to_list round-trips
