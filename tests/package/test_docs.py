"""The docs' examples run (every ```python block in README.md and docs/, and the docstrings),
and the API reference lists every public name."""

from __future__ import annotations

import ast
import doctest
import re
from pathlib import Path

import pytest

import kldiv.divergences
import kldiv.estimators
import kldiv.torch.losses

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
API = ROOT / "docs" / "api"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def blocks():
    for path in [*DOCS, *sorted(API.glob("*.md"))]:
        for i, code in enumerate(BLOCK.findall(path.read_text())):
            yield pytest.param(code, id=f"{path.name}-{i}")


# the examples draw with torch.randn and friends inside exec'd text, where conftest cannot see
@pytest.mark.seeded
@pytest.mark.parametrize("code", list(blocks()))
def test_markdown_example_runs(code):
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def test_every_doc_page_has_examples():
    for path in DOCS:
        assert BLOCK.search(path.read_text()), path


@pytest.mark.seeded  # the doctests draw from torch's global generator
def test_docstring_examples():
    result = doctest.testmod(kldiv.divergences, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 8 and result.failed == 0
    result = doctest.testmod(kldiv.estimators, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 3 and result.failed == 0
    result = doctest.testmod(kldiv.torch.losses, optionflags=doctest.ELLIPSIS)
    assert result.attempted >= 5 and result.failed == 0


# Each public module and its reference page. A page names every public name explicitly: as a
# `::: target`, as an entry of an `options: members:` list, or in inline code (the classes that
# factories make, which the reference lists in a table). So a new name in `__all__` fails here
# until its page lists it. The modules are read with `ast`, not imported: no framework needed.
API_PAGES = {
    "kldiv": "kldiv.md",
    "kldiv.distributions": "distributions.md",
    "kldiv.estimators": "estimators.md",
    "kldiv.metrics": "metrics.md",
    "kldiv.compat": "compat.md",
    "kldiv.torch": "torch.md",
    "kldiv.torch.parallel": "torch_parallel.md",
    "kldiv.keras": "keras.md",
    "kldiv.jax": "jax.md",
    "kldiv.llamacpp": "llamacpp.md",
    "kldiv.topk": "topk.md",
}


def module_tree(name):
    base = ROOT / "src" / Path(*name.split("."))
    path = base / "__init__.py" if base.is_dir() else base.with_suffix(".py")
    return ast.parse(path.read_text())


def public_names(name):
    for node in module_tree(name).body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return ast.literal_eval(node.value)
    raise AssertionError(f"{name} has no __all__")


def missing_docstring(module, name):
    """True when `name` is a function or class (followed through relative imports) without one."""
    tree = module_tree(module)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return not ast.get_docstring(node)
        if (
            isinstance(node, ast.ImportFrom)
            and node.level
            and name in {a.asname or a.name for a in node.names}
        ):
            package = (
                module
                if (ROOT / "src" / Path(*module.split("."))).is_dir()
                else (module.rsplit(".", 1)[0])
            )
            parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            source = f"{parent}.{node.module}" if node.module else f"{parent}.{name}"
            original = next(a.name for a in node.names if (a.asname or a.name) == name)
            return node.module is not None and missing_docstring(source, original)
    return False  # a constant, a submodule or a class made by a factory: listed by hand


def listed_names(text):
    names = set()
    for target in re.findall(r"^::: *([\w.]+)", text, re.M):
        names.add(target.rsplit(".", 1)[-1])
    names.update(re.findall(r"^\s+- (\w+)\s*$", text, re.M))
    for span in re.findall(r"`([^`\n]+)`", text):
        names.update(re.findall(r"\w+", span))
    return names


@pytest.mark.parametrize("module", list(API_PAGES))
def test_api_reference_lists_every_public_name(module):
    page = API / API_PAGES[module]
    names = public_names(module)
    missing = sorted(set(names) - listed_names(page.read_text()))
    assert not missing, f"{page.relative_to(ROOT)} does not list {missing}"
    undocumented = [name for name in names if missing_docstring(module, name)]
    assert not undocumented, f"{module}: public names without a docstring: {undocumented}"


def test_api_reference_pages_are_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in API.glob("*.md"):
        assert f"api/{page.name}" in nav, page
