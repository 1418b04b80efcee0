"""A griffe extension for the API reference: docstrings written for `help()` read well there.

kldiv's docstrings are NumPy style with Sphinx roles and a few reStructuredText habits, and
some are completed at import time. The reference reads the source without importing it and
renders docstrings as Markdown, so before rendering this extension (the source is untouched):

- takes the docstrings of the framework-free modules' functions from the imported module,
  where a decorator completes them (the core's shared Parameters and Returns sections);
- shows a default that is a named constant (``form: FormSpec = FORM``) as its value
  (``form: FormSpec = "probs"``);
- turns Sphinx roles (``:func:`kl_div```, ``:class:`~kldiv.torch.DistillationLoss```) become a link
  to the object's entry when it is part of the public reference, and inline code otherwise;
- doctest blocks (``>>>`` lines) outside an ``Examples`` section become fenced code;
- reStructuredText simple tables (``=====  =====`` borders) become Markdown tables.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
from typing import Any

import griffe

PUBLIC_MODULES = (
    "kldiv",
    "kldiv.distributions",
    "kldiv.estimators",
    "kldiv.metrics",
    "kldiv.compat",
    "kldiv.torch",
    "kldiv.torch.parallel",
    "kldiv.keras",
    "kldiv.jax",
    "kldiv.llamacpp",
    "kldiv.topk",
    "kldiv.integrations.trl",
)

ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|obj|exc):`(~?)([^`<]*?)(?:\s*<([^>`]+)>)?`")
SECTION = re.compile(r"^Examples\n-{3,}\s*$", re.M)
TABLE_BORDER = re.compile(r"^\s*=+(\s+=+)+\s*$")
# Modules that import a framework (or the command line's dependencies): not imported here.
NOT_IMPORTED = ("kldiv.torch", "kldiv.keras", "kldiv.jax", "kldiv.cli", "kldiv.integrations")


class KldivDocstrings(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.path != "kldiv":
            return
        public = _public_paths(pkg)
        for obj in _walk(pkg):
            if obj.is_function:
                _runtime_docstring(obj)
                _literal_defaults(obj)
            if obj.docstring is not None:
                text = _fence_tables(_fence_doctests(obj.docstring.value))
                obj.docstring.value = ROLE.sub(lambda m, o=obj: _role(m, o, pkg, public), text)


def _walk(obj: griffe.Object) -> Any:
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _runtime_docstring(func: griffe.Function) -> None:
    module = func.parent
    if not (module and module.is_module) or module.path.startswith(NOT_IMPORTED):
        return
    try:
        doc = getattr(importlib.import_module(module.path), func.name).__doc__
    except (ImportError, AttributeError):
        return
    if doc:
        doc = inspect.cleandoc(doc)
        if func.docstring is None:
            func.docstring = griffe.Docstring(doc, parent=func)
        elif func.docstring.value != doc:
            func.docstring.value = doc


def _literal_defaults(func: griffe.Function) -> None:
    for param in func.parameters:
        name = str(param.default) if param.default is not None else ""
        if not name.isidentifier() or name in ("None", "True", "False"):
            continue
        try:
            constant = func.module[name]
            if constant.is_alias:
                constant = constant.final_target
            value = str(constant.value)
            ast.literal_eval(value)
        except (KeyError, AttributeError, ValueError, SyntaxError, griffe.AliasResolutionError):
            continue
        param.default = value


def _public_paths(pkg: griffe.Module) -> dict[str, str]:
    """Canonical path -> the path the reference shows it under (modules, exports, members)."""
    paths: dict[str, str] = {}
    for name in PUBLIC_MODULES:
        module = pkg.modules_collection[name]
        paths[module.path] = name
        for export in module.exports or ():
            export = export if isinstance(export, str) else export.name
            try:
                target = module[export]
                if target.is_alias:
                    target = target.final_target
            except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                continue
            shown = f"{name}.{export}"
            paths.setdefault(target.path, shown)
            if target.is_class:
                for member, value in target.members.items():
                    # The reference renders only members with a docstring; the rest (instance
                    # attributes listed in the class's Attributes section) have no anchor.
                    if not member.startswith("_") and _has_docstring(value):
                        paths.setdefault(f"{target.path}.{member}", f"{shown}.{member}")
    return paths


def _has_docstring(member: griffe.Object | griffe.Alias) -> bool:
    try:
        return member.docstring is not None
    except (griffe.AliasResolutionError, griffe.CyclicAliasError):
        return False


def _resolve(target: str, obj: griffe.Object, pkg: griffe.Module) -> str | None:
    head, _, rest = target.partition(".")
    if head == "kldiv":
        path = target
    else:
        scope: griffe.Object | None = obj
        path = None
        while scope is not None:
            if head in scope.members:
                member = scope.members[head]
                path = member.path + (f".{rest}" if rest else "")
                break
            scope = scope.parent
        if path is None:
            return None
    try:
        found = pkg.modules_collection[path]
        if found.is_alias:
            found = found.final_target
        return found.path
    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
        return None


def _role(match: re.Match[str], obj: griffe.Object, pkg: griffe.Module, public: dict) -> str:
    tilde, text, explicit = match.groups()
    target = (explicit or text).strip()
    shown = text.strip() if explicit else (target.rsplit(".", 1)[-1] if tilde else target)
    canonical = _resolve(target, obj, pkg)
    if canonical in public:
        return f"[`{shown}`][{public[canonical]}]"
    return f"`{shown}`"


def _fence_doctests(text: str) -> str:
    match = SECTION.search(text)
    head, tail = (text[: match.start()], text[match.start() :]) if match else (text, "")
    out: list[str] = []
    lines = head.split("\n")
    i = 0
    while i < len(lines):
        if lines[i].lstrip().startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += ["```pycon", *block, "```"]
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out) + tail


def _fence_tables(text: str) -> str:
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        if TABLE_BORDER.match(lines[i]):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            out += _markdown_table(block) or ["```text", *block, "```"]
        else:
            out.append(lines[i])
            i += 1
    return "\n".join(out)


def _markdown_table(block: list[str]) -> list[str] | None:
    """A reStructuredText simple table (one header row) as a Markdown table, or None."""
    borders = [n for n, line in enumerate(block) if TABLE_BORDER.match(line)]
    if len(borders) != 3 or borders[0] != 0 or borders[2] != len(block) - 1:
        return None
    starts = [m.start() for m in re.finditer(r"=+", block[0])]
    rows: list[list[str]] = []
    for n, line in enumerate(block):
        if n in borders:
            continue
        bounds = zip(starts, [*starts[1:], None], strict=True)
        cells = [line[a:b].strip().replace("|", "\\|") for a, b in bounds]
        if rows and not cells[0] and n > borders[1]:
            rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
        else:
            rows.append(cells)
    head, body = rows[0], rows[1:]
    return [
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in body),
    ]
