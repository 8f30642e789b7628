"""The README's Python examples run as written (in a scratch directory, so their out/ paths land there)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_library_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for code in blocks:       # later blocks may use names the earlier ones defined, as a reader would
        exec(compile(code, str(README), "exec"), namespace)
    assert (tmp_path / "out" / "gptq-w4" / "lowbit.json").is_file()
    assert (tmp_path / "out" / "cmp" / "report.md").is_file()
