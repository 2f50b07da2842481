"""Token budgets: how many tokens a keep ratio leaves, and how an image's budget splits over its views."""

from __future__ import annotations

import math
from typing import Literal

ViewBudget = Literal["proportional", "base"]
"""how a multi-view image's budget is split over its views (:func:`split_budget`)"""

BASE_SHARE = 0.5
"""the share of an image's budget its base view (view 0) keeps under ``view_budget="base"``"""


def n_keep(n: int, ratio: float) -> int:
    """floor(n * ratio), at least 1 (for n > 0); the epsilon absorbs float error (0.1 * 570 = 56.99...)."""
    if n <= 0:
        return 0
    return max(1, min(n, int(n * ratio + 1e-6)))


def split_budget(sizes: list[int], ratio: float, rule: ViewBudget = "proportional") -> list[int]:
    """``n_keep(sum(sizes), ratio)`` tokens split over the views of an image of ``sizes`` tokens each (view 0 first):
    a pruner keeping 25% of a multi-view image keeps 25% of all its tokens. Every view keeps at least 1 token and at
    most its size.

    * ``"proportional"``: each view in proportion to its size (largest remainders get the rest).
    * ``"base"``: the base view (view 0) keeps ``ceil(BASE_SHARE * total)``, or all its tokens when it has fewer
      (it never keeps so many that another view gets none, nor so few that the others cannot hold the rest); the
      other views share what is left in proportion to their sizes. One view: the whole budget, as proportional."""
    total = n_keep(sum(sizes), ratio)
    if rule == "proportional" or len(sizes) == 1:
        return _by_size(sizes, total)
    rest = sizes[1:]
    favoured = math.ceil(BASE_SHARE * total - 1e-9)
    base = max(1, min(sizes[0], max(favoured, total - sum(rest)), total - len(rest)))
    return [base] + _by_size(rest, total - base)


def _by_size(sizes: list[int], total: int) -> list[int]:
    """``total`` tokens over views of ``sizes`` in proportion to their sizes, largest remainders first; at least 1
    and at most its size each."""
    share = [total * n / sum(sizes) for n in sizes]
    out = [max(1, min(n, int(x + 1e-6))) for x, n in zip(share, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: share[i] - int(share[i] + 1e-6), reverse=True)
    for i in order:
        if sum(out) >= total:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out
