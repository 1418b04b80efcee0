"""The training part of ``kldiv demo``: distil a digits classifier with forward KL, reverse KL
and JSD, beside a student trained on hard labels, and save the figures.

Data: the 8×8 handwritten digits that scikit-learn ships (1,797 images, no download). Models:
small PyTorch MLPs on the CPU, full-batch Adam, fixed seeds, so a run takes seconds and prints
the same table every time on the same machine. It needs PyTorch, scikit-learn and matplotlib
(``pip install "kldiv[torch,cli]"``); ``kldiv demo`` checks that before it starts.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

import kldiv
from kldiv import _math
from kldiv.metrics import TokenStats

TEMPERATURE = 2.0
TEACHER_STEPS = 300
STUDENT_STEPS = 400
HIDDEN_TEACHER = 128
HIDDEN_STUDENT = 12
LR = 1e-2

STUDENTS = ("hard labels", "forward KL", "reverse KL", "JSD")
# One colour per model in every figure.
COLORS = {
    "teacher": "0.25",
    "hard labels": "tab:orange",
    "forward KL": "tab:blue",
    "reverse KL": "tab:red",
    "JSD": "tab:green",
}


@dataclass
class Result:
    name: str
    accuracy: float
    agreement: float
    agreement_se: float
    kl_mean: float
    kl_se: float
    seconds: float
    losses: list[float] = field(default_factory=list)
    probs: Any = None


def _data(seed: int = 0) -> tuple[Any, ...]:
    import torch
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    cut = int(0.7 * len(y))
    tr, te = order[:cut], order[cut:]
    t = torch.from_numpy
    return t(x[tr]), t(y[tr]), t(x[te]), t(y[te]), digits.images[te]


def _mlp(hidden: int) -> Any:
    import torch

    return torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )


def _loss(name: str, student: Any, teacher: Any, labels: Any) -> Any:
    import torch

    if name == "hard labels":
        return torch.nn.functional.cross_entropy(student, labels)
    kw: dict[str, Any] = {"form": "logits", "temperature": TEMPERATURE}
    if name == "forward KL":  # KL(teacher‖student): mass-covering
        return kldiv.kl_div(teacher, student, **kw)
    if name == "reverse KL":  # KL(student‖teacher): mode-seeking
        return kldiv.reverse_kl_div(teacher, student, **kw)
    return kldiv.js_div(teacher, student, **kw)


def train(out_dir: Path, out: TextIO, progress: bool = True) -> list[Result]:
    """Train the teacher and the four students; write the figures; return the results."""
    import torch

    # The run seeds PyTorch's generator for its fixed results; a caller's own random stream
    # (``kldiv.cli.demo`` called from Python) continues afterwards as if it had not run.
    with torch.random.fork_rng(devices=[]):
        return _train(out_dir, out, progress)


def _train(out_dir: Path, out: TextIO, progress: bool) -> list[Result]:
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(0)
    x_tr, y_tr, x_te, y_te, images = _data()
    total = TEACHER_STEPS + len(STUDENTS) * STUDENT_STEPS
    bar = tqdm(total=total, desc="training", unit="step", file=out, disable=not progress)

    teacher = _mlp(HIDDEN_TEACHER)
    opt = torch.optim.Adam(teacher.parameters(), lr=LR)
    start = time.perf_counter()
    for _ in range(TEACHER_STEPS):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(teacher(x_tr), y_tr)
        loss.backward()
        opt.step()
        bar.set_postfix(model="teacher", loss=f"{loss.item():.3f}", refresh=False)
        bar.update()
    with torch.no_grad():
        t_train, t_test = teacher(x_tr), teacher(x_te)
    results = [_evaluate("teacher", t_test, t_test, y_te, time.perf_counter() - start, [])]

    for name in STUDENTS:
        torch.manual_seed(1)  # every student starts from the same weights
        student = _mlp(HIDDEN_STUDENT)
        opt = torch.optim.Adam(student.parameters(), lr=LR)
        losses = []
        start = time.perf_counter()
        for _ in range(STUDENT_STEPS):
            opt.zero_grad()
            loss = _loss(name, student(x_tr), t_train, y_tr)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(model=name, loss=f"{losses[-1]:.3f}", refresh=False)
            bar.update()
        with torch.no_grad():
            s_test = student(x_te)
        results.append(_evaluate(name, t_test, s_test, y_te, time.perf_counter() - start, losses))
    bar.close()
    _figures(out_dir, results, images, y_te.numpy())
    return results


def _evaluate(
    name: str, teacher: Any, student: Any, labels: Any, seconds: float, losses: list[float]
) -> Result:
    stats = TokenStats()
    stats.update(teacher.numpy(), student.numpy(), form="logits")
    r = stats.report()
    acc = float((student.argmax(-1) == labels).double().mean())
    probs = np.exp(_math.log_softmax(np, student.numpy().astype(np.float64), -1))
    return Result(
        name,
        acc,
        r.top1_agreement,
        r.top1_agreement_stderr,
        r.kl_mean,
        r.kl_stderr,
        seconds,
        losses,
        probs,
    )


def table(results: list[Result]) -> str:
    head = (
        f"{'model':<13}{'test acc':>9}{'agree w/ teacher':>19}{'KL(teacher‖model)':>20}{'time':>7}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        agree = f"{100 * r.agreement:.1f}% ± {100 * r.agreement_se:.1f}"
        kl = f"{r.kl_mean:.4f} ± {r.kl_se:.4f}"
        lines.append(f"{r.name:<13}{100 * r.accuracy:>8.1f}%{agree:>19}{kl:>20}{r.seconds:>6.1f}s")
    return "\n".join(lines)


def _figures(out_dir: Path, results: list[Result], images: Any, labels: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    teacher = results[0].probs
    # The test image the teacher is least sure about: where the divergences disagree most.
    entropy = -(teacher * np.log(np.where(teacher > 0, teacher, 1.0))).sum(-1)
    i = int(np.argmax(entropy))
    fig, (ax_img, ax) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [1, 4]})
    ax_img.imshow(images[i], cmap="gray_r")
    ax_img.set_title(f"test image {i}\nlabel {labels[i]}")
    ax_img.axis("off")
    width = 0.8 / len(results)
    classes = np.arange(10)
    for k, r in enumerate(results):
        offset = (k - (len(results) - 1) / 2) * width
        ax.bar(classes + offset, r.probs[i], width, label=r.name, color=COLORS[r.name])
    ax.set_xticks(classes)
    ax.set_xlabel("class")
    ax.set_ylabel("probability")
    ax.set_title("Teacher vs students on the teacher's least certain test image")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "distributions.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results[1:]:
        ax.plot(r.losses, label=r.name, color=COLORS[r.name])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (each in its own units)")
    ax.set_title(f"Student training losses (distillation at T = {TEMPERATURE:g})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss_curves.png", dpi=110)
    plt.close(fig)
