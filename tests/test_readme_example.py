"""The library-API example in the README runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_library_example_runs(capsys) -> None:
    text = README.read_text()
    match = re.search(r"<!-- readme-example -->\s*```python\n(.*?)```", text, flags=re.S)
    assert match, "README lost its library example block"
    exec(compile(match.group(1), str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert out.strip().endswith("True"), out  # the compact tables fit the budget
    assert "t_C" in out
