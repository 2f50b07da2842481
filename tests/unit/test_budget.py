"""How a multi-view image's budget splits over its views (``budget.split_budget``): known answers for both rules."""

from __future__ import annotations

import pytest

from vlmfast import FoPru, Policy, PolicyError
from vlmfast.budget import n_keep, split_budget


@pytest.mark.parametrize("sizes, keep, proportional, base", [
    ([64, 160], 0.25, [16, 40], [28, 28]),  # 56 tokens: base half = 28
    ([64, 160], 0.3, [19, 48], [34, 33]),  # 67 tokens: the base's half rounds up
    ([576, 2304], 0.25, [144, 576], [360, 360]),  # LLaVA-NeXT at 672 x 672, 720 tokens
    ([576, 2304], 0.5, [288, 1152], [576, 864]),  # base smaller than its half (720): all of it, the rest to the tiles
    ([64, 8], 0.9, [57, 7], [56, 8]),  # 64 tokens; the other view holds only 8, so the base keeps 56, not 32
    ([64, 160, 32], 0.25, [16, 40, 8], [32, 27, 5]),  # three views: the others share 32 by size (26.7, 5.3)
    ([64, 160], 1.0, [64, 160], [64, 160]),
    ([64, 160], 0.01, [1, 1], [1, 1]),  # 2 tokens: every view keeps at least one
])
def test_split_known_answers(sizes, keep, proportional, base):
    assert split_budget(sizes, keep) == split_budget(sizes, keep, "proportional") == proportional
    assert split_budget(sizes, keep, "base") == base


def test_one_view_is_the_whole_budget_under_either_rule():
    assert split_budget([64], 0.25, "base") == split_budget([64], 0.25) == [16]


@pytest.mark.parametrize("rule", ["proportional", "base"])
@pytest.mark.parametrize("sizes", [[64, 160], [576, 1728], [576, 2304, 100], [9, 500]])
def test_the_split_spends_exactly_the_images_budget(rule, sizes):
    for keep in [0.02, 0.05, 0.1, 0.25, 0.33, 0.5, 0.75, 0.9, 1.0]:
        out = split_budget(sizes, keep, rule)
        assert sum(out) == max(n_keep(sum(sizes), keep), len(sizes)), (keep, out)
        assert all(1 <= k <= n for k, n in zip(out, sizes)), (keep, out)


def test_view_budget_is_a_field_of_every_vision_pruner_and_of_the_policy_file():
    pol = Policy.from_dict({"methods": [{"method": "fopru", "keep": 0.25, "view_budget": "base"},
                                        {"method": "divprune", "keep": 0.5}]})
    assert pol.methods[0].view_budget == "base" and pol.methods[1].view_budget == "proportional"
    assert Policy.from_dict(pol.to_dict()) == pol
    # written last, and only where it is not the default (policy files of one-view models stay as they were)
    assert pol.to_dict()["methods"] == [{"method": "fopru", "keep": 0.25, "strategy": "rank", "layer": None,
                                         "view_budget": "base"}, {"method": "divprune", "keep": 0.5}]
    assert FoPru(0.3).keep == 0.3  # keyword-only: positional fields stay the method's own
    with pytest.raises(PolicyError, match=r"methods\[0\] \(fopru\)\.view_budget: Input should be 'proportional' or "
                                          r"'base' \(got 'global'\)"):
        Policy.from_dict({"methods": [{"method": "fopru", "view_budget": "global"}]})
