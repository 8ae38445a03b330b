"""The public API: `sharded_mde.__all__` loads, every name has Args/Example docs, and docs/api.md runs as written."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import sharded_mde

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_every_public_name_loads_and_has_args_and_example() -> None:
    missing = []
    for name in sharded_mde.__all__:
        doc = inspect.getdoc(getattr(sharded_mde, name)) or ""
        if "Args:" not in doc or "Example::" not in doc:
            missing.append(name)
    assert not missing, f"public names without Args:/Example:: docstrings: {missing}"


def test_masked_ebc_is_an_embedding_bag_collection_interface() -> None:
    from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface
    assert issubclass(sharded_mde.MaskedEmbeddingBagCollection, EmbeddingBagCollectionInterface)


def test_api_doc_lists_every_name_and_its_examples_run(capsys) -> None:
    text = DOC.read_text()
    absent = [n for n in sharded_mde.__all__ if f"`{n}`" not in text]
    assert not absent, f"docs/api.md does not list {absent}"
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 8
    scope = {"__name__": "api_docs"}
    for i, block in enumerate(blocks):  # one script, in order: later examples use earlier objects
        exec(compile(block, f"{DOC}:block{i}", "exec"), scope)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "torch.Size([64, 1])"
    assert out[1].startswith("True [(")  # the search's dims fit the budget
    assert out[-1] == "True"  # the export serves what the trained model computes
