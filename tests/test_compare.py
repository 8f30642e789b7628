import json

from lowbit.cli import main


def test_compare_writes_report_and_matches_separate_eval(capsys, tmp_path, tiny_dir):
    out = tmp_path / "cmp"
    args = ["--quiet", "compare", str(tiny_dir), "--methods", "rtn,gptq,awq", "--bits", "4", "--group-size", "32",
            "--asym", "--calib-samples", "4", "--calib-seqlen", "64", "--ctx", "32", "--max-windows", "3",
            "--out", str(out)]
    assert main(args) == 0
    for f in ("report.md", "report.json", "tradeoff.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0
    assert (out / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) >= {"rtn-w4g32-asym", "gptq-w4g32-asym", "awq-w4g32-asym"}
    md = (out / "report.md").read_text()
    assert "gptq-w4g32-asym" in md and "KLD vs base" in md
    capsys.readouterr()
    for label in ("rtn-w4g32-asym", "gptq-w4g32-asym", "awq-w4g32-asym"):
        js = tmp_path / f"{label}.json"
        assert main(["--quiet", "eval", str(out / label), "--ctx", "32", "--max-windows", "3", "--no-speed",
                     "--json", str(js)]) == 0
        r = json.loads(js.read_text())
        for key in ("ppl", "kld", "top1", "bytes", "bits_per_weight"):
            assert r[key] == rows[label][key], (label, key)


def test_compare_rejects_unknown_method(capsys, tmp_path):
    code = main(["--quiet", "compare", "default", "--methods", "rtn,magic", "--out", str(tmp_path / "x")])
    assert code == 2 and "unknown method(s) magic" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
