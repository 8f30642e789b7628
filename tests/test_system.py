"""The machine facts recorded beside every measurement (lowbit.eval.system)."""

from lowbit.eval.system import cpu_generation, cpuinfo_fields, environment

ZEN4 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
stepping\t: 1

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
"""


def test_generation_is_the_first_processors_family_and_model():
    # decimal, as /proc/cpuinfo writes them; a second processor block (another socket's) does not override it
    assert cpu_generation(ZEN4) == "family 25, model 17"


def test_fields_are_each_keys_first_value():
    fields = cpuinfo_fields(ZEN4 + "a line without a colon\n")
    assert fields["vendor_id"] == "AuthenticAMD" and fields["model name"] == "AMD EPYC"
    assert fields["cpu family"] == "25" and fields["model"] == "17"   # "model" is not "model name"
    assert "a line without a colon" not in fields


def test_generation_is_empty_where_cpuinfo_does_not_say():
    assert cpu_generation("") == ""
    assert cpu_generation("processor\t: 0\nmodel name\t: some ARM core\n") == ""
    assert cpu_generation("cpu family\t: ?\nmodel\t\t: 17\n") == ""


def test_environment_names_the_generation_beside_the_model_name():
    env = environment()
    generation = cpu_generation()
    if generation:   # an x86 Linux machine
        assert env["cpu"].endswith(f" ({generation})") and len(env["cpu"]) > len(generation) + 3
    else:
        assert env["cpu"] and "family" not in env["cpu"]
    assert env["cores"] >= 1 and env["torch_threads"] >= 1
