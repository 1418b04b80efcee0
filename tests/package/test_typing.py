"""The public API as type checkers and IDEs see it: real signatures (no decorator hides them)
and string options as ``Literal`` types, defined once in ``kldiv._defaults``.

One mypy run (through ``mypy.api``) checks a small snippet. The frameworks are not analysed
(``follow_imports = skip``: they are ``Any`` here), which keeps a cold run to a few seconds;
kldiv's own signatures are what is under test. ``make typecheck`` checks ``src/`` itself.
"""

from __future__ import annotations

import re
import textwrap
from typing import get_args

import pytest
from mypy import api as mypy_api

import kldiv
from kldiv import _defaults, _kinds, estimators

# Each line that must type-check ends in "# ok", each that must not in "# E"; reveal_type lines
# are read by name.
SNIPPET = """
from typing import Any

import kldiv
from kldiv import compat, estimators
from kldiv.keras import KLDivergence as KerasKL
from kldiv.torch import DistillationLoss, KLDivergence, TopKTeacher

p: Any = None
reveal_type(kldiv.kl_div)
reveal_type(kldiv.js_div)
reveal_type(compat.torch_kl_div)
kldiv.kl_div(p, p)  # ok
kldiv.kl_div(p, p, form="logits", reduction="sum", temperature=2.0)  # ok
kldiv.kl_div(p, p, form=("log_probs", "logits"))  # ok
kldiv.js_div(p, p, beta=0.3, reduction="none")  # ok
kldiv.divergence(p, p, "skew_reverse_kl", alpha=0.2)  # ok
DistillationLoss(fast_path="chunked")  # ok
DistillationLoss("js", fast_path=False, reduction="sum")  # ok
KLDivergence(form="logits", reduction="none")  # ok
TopKTeacher(p, p, tail="renormalize")  # ok
estimators.kl_estimate(p, p, estimator="k1", grad_estimator="k2")  # ok
compat.torch_kl_div(p, p, reduction="batchmean")  # ok
compat.verl_kl_penalty(p, p, "k3+")  # ok
KerasKL(form="logits")  # ok
kldiv.kl_div(p, p, reduction="batchmean")  # E
kldiv.kl_div(p, p, form="log_softmax")  # E
kldiv.kl_div(p, p, form=("logits", "logit"))  # E
kldiv.kl_div(p, p, axis=-1, mask=None, bogus=1)  # E
kldiv.divergence(p, p, "jsd")  # E
DistillationLoss(fast_path="fused")  # E
DistillationLoss("symmetric_kl")  # E
KLDivergence(reduction="batchmean")  # E
TopKTeacher(p, p, tail="drop")  # E
estimators.kl_estimate(p, p, estimator="k4")  # E
compat.verl_kl_penalty(p, p, "k4")  # E
"""

# Frameworks as Any; kldiv analysed for its signatures, its own diagnostics not reported.
CONFIG = """
[mypy]
python_version = 3.10
[mypy-numpy.*,torch.*,jax.*,jaxlib.*,array_api_compat.*,keras.*,scipy.*,triton.*,tqdm.*,ml_dtypes.*,matplotlib.*,safetensors.*,sklearn.*]
follow_imports = skip
follow_imports_for_stubs = True
ignore_missing_imports = True
[mypy-kldiv.*]
follow_imports = silent
"""


@pytest.fixture(scope="module")
def checked(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], dict[int, str]]:
    """The snippet's lines and mypy's messages for them, by line number."""
    root = tmp_path_factory.mktemp("typing")
    source = root / "snippet.py"
    source.write_text(textwrap.dedent(SNIPPET))
    config = root / "mypy.ini"
    config.write_text(CONFIG)
    stdout, stderr, _ = mypy_api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(root / ".mypy_cache"),
            "--no-error-summary",
            "--show-error-codes",
            "--hide-error-context",
            str(source),
        ]
    )
    assert not stderr, stderr
    messages: dict[int, str] = {}
    for line in stdout.splitlines():
        m = re.match(r".*snippet\.py:(\d+): (.*)$", line)
        assert m, f"unexpected mypy output: {line}"
        n = int(m.group(1))
        messages[n] = messages.get(n, "") + m.group(2) + "\n"
    return source.read_text().splitlines(), messages


def _revealed(checked: tuple[list[str], dict[int, str]], expr: str) -> str:
    lines, messages = checked
    n = lines.index(f"reveal_type({expr})") + 1
    m = re.search(r'Revealed type is "(.*)"', messages.get(n, ""))
    assert m, messages.get(n)
    return m.group(1)


def _param(signature: str, name: str) -> str:
    """The type of parameter ``name`` in a revealed ``def (...)``."""
    m = re.search(rf"\b{name}: (.*?) =?(, \w+:|\) ->)", signature)
    assert m, f"no parameter {name!r} in {signature}"
    return m.group(1)


def _options(annotation: str) -> set[str]:
    return set(re.findall(r"'(\w+\+?)'", annotation))


def test_kl_div_signature_is_visible(checked):
    sig = _revealed(checked, "kldiv.kl_div")
    assert sig.startswith("def (p: Any, q: Any, *, form: ")
    for name in ("form", "axis", "reduction", "mask", "weight", "num_items", "temperature"):
        assert f"{name}: " in sig
    assert "Literal[" in _param(sig, "form")
    assert _options(_param(sig, "form")) == {"probs", "logits", "log_probs"}
    assert "tuple[" in _param(sig, "form")  # a (form of p, form of q) pair
    assert "Literal[" in _param(sig, "reduction")
    assert _options(_param(sig, "reduction")) == {"mean", "sum", "none"}
    assert _param(sig, "temperature") == "float"


def test_other_decorated_functions_keep_their_signatures(checked):
    js = _revealed(checked, "kldiv.js_div")
    assert "beta: float" in js and _options(_param(js, "reduction")) == {"mean", "sum", "none"}
    torch_kl = _revealed(checked, "compat.torch_kl_div")
    assert torch_kl.startswith("def (input: Any, target: Any, reduction: ")
    assert _options(_param(torch_kl, "reduction")) == {"mean", "batchmean", "sum", "none"}


def test_valid_options_type_check_and_invalid_ones_are_errors(checked):
    lines, messages = checked
    for n, line in enumerate(lines, 1):
        if line.endswith("# ok"):
            assert n not in messages, f"line {n}: {line}\n{messages[n]}"
        elif line.endswith("# E"):
            assert "error:" in messages.get(n, ""), f"line {n} type-checks: {line}"
    batchmean = lines.index('kldiv.kl_div(p, p, reduction="batchmean")  # E') + 1
    assert "Literal['batchmean']" in messages[batchmean]
    assert "[arg-type]" in messages[batchmean]


def test_option_tuples_match_the_literals():
    """The runtime validation's tuples are the Literal types' options, in the same order."""
    from kldiv.torch import distillation, topk

    assert _defaults.FORMS == get_args(_defaults.Form) == ("probs", "logits", "log_probs")
    assert _defaults.REDUCTIONS == get_args(_defaults.Reduction) == ("mean", "sum", "none")
    assert tuple(kldiv.KINDS) == get_args(_defaults.Kind)
    assert set(_kinds.KIND_PARAMS) <= set(kldiv.KINDS)
    assert distillation.DIVERGENCES == topk.KINDS == get_args(_defaults.DistillationKind)
    assert set(get_args(_defaults.DistillationKind)) == set(kldiv.KINDS) - {"symmetric_kl"}
    assert topk.TAIL_POLICIES == get_args(_defaults.TailPolicy)
    assert estimators.ESTIMATORS == get_args(_defaults.Estimator) == ("k1", "k2", "k3")
    assert _defaults.FAST_PATHS == (True, False, "triton", "chunked")
    assert _defaults.FORM in _defaults.FORMS and _defaults.REDUCTION in _defaults.REDUCTIONS
