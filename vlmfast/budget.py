"""Token budgets: how many tokens a keep ratio leaves, and how an image's budget splits over its views."""

from __future__ import annotations


def n_keep(n: int, ratio: float) -> int:
    """floor(n * ratio), at least 1 (for n > 0); the epsilon absorbs float error (0.1 * 570 = 56.99...)."""
    if n <= 0:
        return 0
    return max(1, min(n, int(n * ratio + 1e-6)))


def split_budget(sizes: list[int], ratio: float) -> list[int]:
    """``n_keep(sum(sizes), ratio)`` tokens split over views of ``sizes`` tokens in proportion to their sizes
    (largest remainders get the rest), at least 1 and at most its size each: a pruner keeping 25% of a multi-view
    image keeps 25% of all its tokens."""
    total = n_keep(sum(sizes), ratio)
    share = [total * n / sum(sizes) for n in sizes]
    out = [max(1, min(n, int(x + 1e-6))) for x, n in zip(share, sizes)]
    order = sorted(range(len(sizes)), key=lambda i: share[i] - int(share[i] + 1e-6), reverse=True)
    for i in order:
        if sum(out) >= total:
            break
        if out[i] < sizes[i]:
            out[i] += 1
    return out
