"""Streaming, mergeable statistics of per-token KL(P‖Q) between two models' token distributions.

The report quantisation and distillation work needs: feed a reference model's outputs ``ref``
(the distributions P) and a candidate's ``cand`` (Q) for the same tokens, chunk by chunk, and get
the distribution of the per-token divergence

    KL(P‖Q) = Σ_v p_v·(log p_v − log q_v)        (direction: KL(ref‖cand))

as mean ± standard error, maximum and exact percentiles, the top-1 agreement of the two models
and, with ``labels``, the change in the probability of the correct token and the perplexity
ratio. It is the report llama.cpp's ``--kl-divergence`` prints, computed exactly: every
per-token value is kept (one float64 per token and statistic), so percentiles are exact order
statistics rather than a sketch, and merging partial results (e.g. from several processes)
gives the same report, bit for bit, as one pass over all tokens.

>>> import numpy as np
>>> from kldiv.metrics import TokenStats
>>> ref = np.array([[0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]])
>>> cand = np.array([[0.3, 0.4, 0.1, 0.2], [0.25, 0.25, 0.25, 0.25]])
>>> stats = TokenStats()
>>> stats.update(ref, cand, form="probs")   # streams: call once per chunk
>>> r = stats.report()
>>> r.num_tokens, round(r.kl_mean, 6), round(r.kl_max, 6), r.top1_agreement
(2, 0.049897, 0.099793, 1.0)
>>> a, b = TokenStats(), TokenStats()
>>> a.update(ref[:1], cand[:1], form="probs"); b.update(ref[1:], cand[1:], form="probs")
>>> a.merge(b).report() == r
True
>>> print(r.to_text())  # doctest: +ELLIPSIS
KL(ref‖cand) over 2 tokens
...

Accuracy: every chunk is converted to float64 before the log-softmax and the KL, so per-token
values match a float64 reference whatever the input dtype (float16, bfloat16, float32 or
float64). Zero support is exact, as in :func:`kldiv.kl_div`: terms with p = 0 count 0, p > 0
where q = 0 gives a per-token KL of +inf, and ``-inf`` logits are zero probabilities.

Memory: one float64 per token for the KL and, with labels, three more (Δp and both negative
log-likelihoods), plus one byte for top-1 agreement: about 8 bytes per token per statistic. The
``[N, V]`` input is processed in blocks of rows, so temporaries stay a few MB whatever the size
of the chunk passed to :meth:`TokenStats.update`.
"""

from .extended import ExtendedReport, extended_report, token_divergences
from .report import PERCENTILES, KLReport
from .tokens import IGNORE_INDEX, TokenStats

__all__ = [
    "TokenStats",
    "KLReport",
    "PERCENTILES",
    "IGNORE_INDEX",
    "ExtendedReport",
    "extended_report",
    "token_divergences",
]
