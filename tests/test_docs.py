"""The docs' examples run: every ```python block in README.md and docs/, and the docstrings."""

from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

import kldiv.divergences
import kldiv.estimators
import kldiv.torch.losses

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for path in DOCS:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}-{i}")


@pytest.mark.parametrize("code", list(blocks()))
def test_markdown_example_runs(code):
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_every_doc_page_has_examples():
    for path in DOCS:
        assert BLOCK.search(path.read_text()), path


def test_docstring_examples():
    result = doctest.testmod(kldiv.divergences, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
    result = doctest.testmod(kldiv.estimators, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
    result = doctest.testmod(kldiv.torch.losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0
