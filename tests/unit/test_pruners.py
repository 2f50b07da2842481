"""FoPru and FastV on hand-made inputs with known answers."""

from __future__ import annotations

import pytest
import torch

from vlmfast.adapters.base import ImageTokens
from vlmfast.pruners import FastV, FoPru, n_keep
from vlmfast.pruners.fopru import significance


def image(attn: torch.Tensor, grid=(1, 2, 2), ppt: int = 1) -> ImageTokens:
    n = grid[0] * grid[1] * grid[2]
    return ImageTokens(features=torch.zeros(n, 4), grid=grid, attention=attn, patches_per_token=ppt)


def column_attention(received: list[float]) -> torch.Tensor:
    """Every query attends with the same distribution -> column means = ``received``, row means constant."""
    r = torch.tensor(received)
    return (r / r.sum()).expand(len(received), -1).clone()


def test_significance_picks_column_mean_when_it_varies_more():
    a = column_attention([1, 5, 2, 8])
    assert torch.allclose(significance(a), a.mean(0))


def test_significance_picks_row_mean_when_it_varies_more():
    a = column_attention([1, 1, 1, 1]) * torch.tensor([[0.1], [0.9], [0.5], [0.2]])  # rows scaled, columns flat
    assert torch.allclose(significance(a), a.mean(1))


def test_significance_sums_merged_patches():
    a = column_attention([1, 2, 3, 4, 10, 20, 30, 40])
    assert torch.allclose(significance(a, patches_per_token=4), torch.tensor([10.0, 100.0]) / 110 / 1)


def test_rank_keeps_top_k_in_original_order():
    received = [3, 9, 1, 7, 5, 8, 2, 6, 4]  # 3x3 grid
    img = image(column_attention(received), grid=(1, 3, 3))
    assert FoPru(keep=4 / 9, strategy="rank").select(img).tolist() == [1, 3, 5, 7]  # 9, 7, 8, 6
    assert FoPru(keep=1 / 3, strategy="rank").select(img).tolist() == [1, 3, 5]


def test_row_keeps_whole_rows_with_largest_sum():
    # 3 rows of 3: row sums 13, 20, 12 -> keep 1 row = row 1 (indices 3..5); 2 rows = rows 0 and 1
    received = [3, 9, 1, 7, 5, 8, 2, 6, 4]
    img = image(column_attention(received), grid=(1, 3, 3))
    assert FoPru(keep=0.34, strategy="row").select(img).tolist() == [3, 4, 5]
    assert FoPru(keep=0.67, strategy="row").select(img).tolist() == [0, 1, 2, 3, 4, 5]


def test_rank_and_row_differ_on_the_same_matrix():
    received = [9, 1, 1, 1, 8, 8, 1, 1, 1]  # rank top-3 = {0, 4, 5}; best row = row 1 (3..5)
    img = image(column_attention(received), grid=(1, 3, 3))
    assert FoPru(keep=1 / 3, strategy="rank").select(img).tolist() == [0, 4, 5]
    assert FoPru(keep=1 / 3, strategy="row").select(img).tolist() == [3, 4, 5]


@pytest.mark.parametrize("n,ratio,expected", [(576, 0.25, 144), (576, 0.1, 57), (576, 0.5, 288), (576, 1.0, 576),
                                              (570, 0.1, 57), (10, 0.01, 1), (0, 0.5, 0)])
def test_n_keep_is_floor_with_minimum_one(n, ratio, expected):
    assert n_keep(n, ratio) == expected


@pytest.mark.parametrize("keep", [0.05, 0.1, 0.25, 0.5, 1.0])
def test_fopru_exact_counts_sorted_unique(keep):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(576, 576, generator=g).softmax(-1)
    idx = FoPru(keep=keep).select(image(a, grid=(1, 24, 24)))
    assert idx.numel() == n_keep(576, keep)
    assert torch.equal(idx, idx.unique(sorted=True))
    rows = FoPru(keep=keep, strategy="row").select(image(a, grid=(1, 24, 24)))
    assert rows.numel() == n_keep(24, keep) * 24


def test_fopru_merged_tokens_qwen_layout():
    # 4 merged tokens of 4 patches each; token 2 receives the most attention, then token 0
    received = [1, 1, 1, 1, 2, 0, 0, 0, 5, 5, 5, 5, 0, 0, 0, 1]
    img = image(column_attention(received), grid=(1, 2, 2), ppt=4)
    assert FoPru(keep=0.5).select(img).tolist() == [0, 2]


def test_fastv_keeps_top_image_tokens_and_all_text():
    scores = torch.tensor([[0.30, 0.01, 0.20, 0.05, 0.10, 0.02, 0.32]])
    image_mask = torch.tensor([[False, True, True, True, True, True, False]])
    valid = torch.ones_like(image_mask)
    keep = FastV(layer=2, keep=0.4).select_layer(scores, image_mask, valid)  # 5 image tokens -> keep 2: idx 2 and 4
    assert keep.tolist() == [[True, False, True, False, True, False, True]]


def test_fastv_ignores_padding_when_counting():
    scores = torch.tensor([[0.9, 0.9, 0.1, 0.5, 0.2, 0.3]])
    image_mask = torch.tensor([[True, True, True, True, True, False]])
    valid = torch.tensor([[False, False, True, True, True, True]])  # the first two are left padding
    keep = FastV(layer=2, keep=0.34).select_layer(scores, image_mask, valid)  # 3 real image tokens -> keep 1 (idx 3)
    assert keep[0, 2:].tolist() == [False, True, False, True]


def test_fastervlm_keeps_top_cls_attention():
    from vlmfast.pruners import FasterVLM

    img = image(column_attention([1, 1, 1, 1]))
    img.cls_attention = torch.tensor([0.1, 0.5, 0.05, 0.35])
    assert FasterVLM(keep=0.5).select(img).tolist() == [1, 3]


def test_fastervlm_without_cls_uses_received_attention():
    from vlmfast.pruners import FasterVLM

    # token 0's patches receive 1+9+1+1 = 12, token 1's 2+2+2+1 = 7
    img = image(column_attention([1, 9, 1, 1, 2, 2, 2, 1]), grid=(1, 1, 2), ppt=4)
    assert FasterVLM(keep=0.5).select(img).tolist() == [0]


def test_divprune_picks_diverse_tokens():
    from vlmfast.pruners.divprune import max_min_diverse

    x = torch.tensor([[1.0, 0, 0], [0.99, 0.01, 0], [0, 1.0, 0], [0, 0, 1.0], [0.98, 0, 0.02]])
    chosen = set(max_min_diverse(x, 3).tolist())
    assert {2, 3} <= chosen and len(chosen & {0, 1, 4}) == 1  # one of the three near-duplicates


def test_visionzip_merges_rest_into_anchors_at_anchor_positions():
    from vlmfast.pruners import VisionZip

    n = 8
    feats = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)
    keys = torch.tensor([[1.0, 0]] * 4 + [[0, 1.0]] * 4)  # two key clusters: tokens 0-3 and 4-7
    img = ImageTokens(features=feats, grid=(1, 2, 4), attention=torch.full((n, n), 1 / n),
                      cls_attention=torch.tensor([0.9, 0, 0, 0, 0, 0, 0, 0.8]), keys=keys)
    vz = VisionZip(keep=0.5, contextual=0.5)  # budget 4: 2 dominant (0, 7) + 2 contextual
    keep, out, _ = vz.prune(img)
    # the rest is 1..6; anchors at stride 3 are tokens 1 and 4
    assert keep.tolist() == [0, 1, 4, 7]
    assert torch.allclose(out[0], feats[0]) and torch.allclose(out[3], feats[7])
    assert torch.allclose(out[1], feats[[1, 2, 3]].mean(0))  # cluster of token 1: 1, 2, 3
    assert torch.allclose(out[2], feats[[4, 5, 6]].mean(0))


def test_random_is_seeded():
    from vlmfast.pruners import RandomPruner

    img = image(column_attention([1] * 16), grid=(1, 4, 4))
    a, b = RandomPruner(keep=0.25, seed=3).select(img), RandomPruner(keep=0.25, seed=3).select(img)
    assert torch.equal(a, b) and a.numel() == 4
    assert not torch.equal(a, RandomPruner(keep=0.25, seed=4).select(img))


def test_random_draws_each_frame_group_anew():
    """A video's frame groups keep their own random cells (one generator drawn in turn), reproducibly."""
    from vlmfast.pruners import RandomPruner

    feats = torch.randn(3 * 16, 8)
    video = ImageTokens(features=feats, grid=(3, 4, 4))
    keep = RandomPruner(keep=0.25, seed=3).prune_visual(video).keep
    cells = [(keep[(keep >= 16 * g) & (keep < 16 * (g + 1))] - 16 * g).tolist() for g in range(3)]
    assert [len(c) for c in cells] == [4, 4, 4] and len({tuple(c) for c in cells}) > 1
    assert torch.equal(keep, RandomPruner(keep=0.25, seed=3).prune_visual(video).keep)
    assert cells[0] == RandomPruner(keep=0.25, seed=3).select(ImageTokens(features=feats[:16], grid=(1, 4, 4))).tolist()


def test_vflowopt_context_relevance_uses_global_tokens():
    from vlmfast.pruners.vflowopt import context_relevance

    a = torch.full((4, 4), 0.1)
    a[:, 0] = 0.7  # token 0 receives most attention -> the only global token at t=2
    a[0] = torch.tensor([0.1, 0.2, 0.6, 0.1])  # and the global token attends mostly to token 2
    c = context_relevance(a, t=2.0)
    assert torch.allclose(c, a[0])
    assert torch.allclose(context_relevance(a, t=100.0), a.mean(0))  # nobody global -> everyone


def test_patch_entropy_known_values():
    from vlmfast.pruners.vflowopt import patch_entropy

    flat = torch.full((1, 16), 7.0)
    two = torch.tensor([[0.0] * 8 + [255.0] * 8])
    four = torch.tensor([[0.0, 1.0, 2.0, 3.0] * 4])
    assert patch_entropy(torch.cat([flat, two, four])).tolist() == pytest.approx([0.0, 1.0, 2.0], abs=1e-6)


def test_vflowopt_recycles_pruned_tokens_per_cell():
    from vlmfast.pruners import VFlowOpt
    from vlmfast.pruners.vflowopt import recycle

    feats = torch.arange(16, dtype=torch.float32)[:, None]
    img = ImageTokens(features=feats, grid=(1, 4, 4))
    imp = torch.tensor([9.0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 8])
    # keep 4 of 16 with m=2: n_extra = 16 / 4 = 4 -> clamp to k-1 = 3; top-1 kept (token 0), 15 pruned in 4 cells
    res = recycle(img, imp, keep=0.25, m=2.0)
    assert res.keep.tolist()[0] == 0 and len(res.keep) == 4
    # the bottom-right cell (tokens 10, 11, 14, 15) has the most pruned importance: merged into token 15's slot
    i = res.keep.tolist().index(15)
    w = imp[[10, 11, 14, 15]] / imp[[10, 11, 14, 15]].sum()
    assert torch.allclose(res.features[i], (w[:, None] * feats[[10, 11, 14, 15]]).sum(0))
    assert res.keep.tolist() == sorted(res.keep.tolist())
    full = VFlowOpt(keep=1.0).prune(ImageTokens(features=feats, grid=(1, 4, 4), attention=torch.eye(16)))
    assert full.keep.tolist() == list(range(16)) and torch.equal(full.features, feats)


# -- CDPruner: greedy MAP of the instruction-conditioned DPP ----------------------------------------------------


def _brute_force_next(kernel: torch.Tensor, chosen: list[int]) -> int:
    """The token whose addition gives the largest det(L_Y) (log-det by brute force)."""
    best, arg = -float("inf"), -1
    for i in range(kernel.shape[0]):
        if i in chosen:
            continue
        y = chosen + [i]
        v = float(torch.logdet(kernel[y][:, y].double()))
        if v > best:
            best, arg = v, i
    return arg


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cdpruner_greedy_map_takes_the_largest_log_det_at_every_step(seed):
    from vlmfast.pruners.cdpruner import conditional_kernel, greedy_map

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, 12, generator=g)
    r = torch.rand(9, generator=g)
    kernel = conditional_kernel(x, r)
    order = greedy_map(kernel, 6).tolist()
    for step in range(6):
        assert order[step] == _brute_force_next(kernel, order[:step])


def test_cdpruner_keeps_a_diverse_token_over_a_relevant_duplicate():
    from vlmfast.pruners import CDPruner
    from vlmfast.pruners.cdpruner import instruction_relevance

    # A, its near-duplicate A', B (orthogonal to both), C (irrelevant: cos 0 with the instruction)
    x = torch.tensor([[1.0, 0, 0], [0.99, 0.14, 0], [0, 0, 1.0], [0, -1.0, 0]])
    text = torch.tensor([[1.0, 0, 0.5]])
    r = instruction_relevance(x, text)
    assert r[3] == 0 and r[0] == 1 and r[1] > r[2] > 0  # A' is more relevant than B
    assert r.topk(2).indices.sort().values.tolist() == [0, 1]  # relevance alone keeps the duplicate
    img = ImageTokens(features=x, grid=(1, 2, 2), instruction=text)
    assert CDPruner(keep=0.5).select(img).tolist() == [0, 2]


def test_cdpruner_instruction_changes_the_choice():
    from vlmfast.pruners import CDPruner

    x = torch.eye(4)  # four orthogonal tokens: det of any subset is the product of its q_i^2
    pick = [CDPruner(keep=0.25).select(ImageTokens(features=x, grid=(1, 2, 2), instruction=x[[i]])).tolist()
            for i in range(4)]
    assert pick == [[0], [1], [2], [3]]
    both = ImageTokens(features=x, grid=(1, 2, 2), instruction=x[[1, 3]])
    assert CDPruner(keep=0.5).select(both).tolist() == [1, 3]


def test_cdpruner_theta_zero_or_no_instruction_is_plain_dpp_diversity():
    from vlmfast.pruners import CDPruner
    from vlmfast.pruners.cdpruner import conditional_kernel, greedy_map

    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 8, generator=g)
    plain = greedy_map(conditional_kernel(x, torch.ones(16)), 4).sort().values.tolist()
    texts = [torch.randn(3, 8, generator=g) for _ in range(3)]
    conditioned = {tuple(CDPruner(keep=0.25).select(ImageTokens(features=x, grid=(1, 4, 4), instruction=t)).tolist())
                   for t in texts}
    assert len(conditioned) > 1  # the kernel diag(r) S diag(r) follows the instruction
    for t in texts:
        img = ImageTokens(features=x, grid=(1, 4, 4), instruction=t)
        assert CDPruner(keep=0.25, theta=0.0).select(img).tolist() == plain
    for empty in (None, torch.zeros(0, 8)):
        assert CDPruner(keep=0.25).select(ImageTokens(features=x, grid=(1, 4, 4), instruction=empty)).tolist() == plain


def test_cdpruner_theta_trades_relevance_for_diversity():
    from vlmfast.pruners import CDPruner

    # A relevant, A' its near-duplicate (as relevant), B diverse but less relevant
    x = torch.tensor([[1.0, 0, 0], [0.995, 0.1, 0], [0, 0, 1.0], [0, -1.0, 0]])
    text = torch.tensor([[1.0, 0, 0.3]])
    img = ImageTokens(features=x, grid=(1, 2, 2), instruction=text)
    assert CDPruner(keep=0.5, theta=0.0).select(img).tolist() != [0, 1]
    assert CDPruner(keep=0.5, theta=0.9).select(img).tolist() == [0, 1]  # relevance dominates: the top-2


def test_cdpruner_spent_rank_fills_the_budget_by_relevance():
    from vlmfast.pruners import CDPruner

    # six tokens in a plane (rank 2): after two picks every determinant gain is 0
    angles = torch.tensor([0.0, 0.1, 1.6, 0.2, 3.0, 0.3])
    x = torch.stack([angles.cos(), angles.sin()], 1)
    text = torch.tensor([[1.0, 0.0]])  # relevance falls with the angle, but cos(3.0) < 0 is the least
    img = ImageTokens(features=x, grid=(1, 2, 3), instruction=text)
    keep = CDPruner(keep=4 / 6).select(img).tolist()
    # greedy: token 0 (r = 1), then the gain r_i^2 sin^2(angle_i) is largest for token 2; then by relevance: 1, 3
    assert keep == [0, 1, 2, 3]


@pytest.mark.parametrize("keep", [1.0, 0.5, 0.3, 0.1, 0.01])
def test_cdpruner_exact_counts_sorted_unique(keep):
    from vlmfast.pruners import CDPruner

    g = torch.Generator().manual_seed(7)
    img = ImageTokens(features=torch.randn(48, 6, generator=g), grid=(1, 6, 8),
                      instruction=torch.randn(5, 6, generator=g))
    out = CDPruner(keep=keep).select(img).tolist()
    assert out == sorted(set(out)) and len(out) == n_keep(48, keep)
    if keep == 1.0:
        assert out == list(range(48))


# -- downsample: the image resized to the budget's grid ---------------------------------------------------------


@pytest.mark.parametrize("h, w, k, expected", [(24, 24, 57, (7, 8)), (24, 24, 144, (12, 12)), (12, 12, 14, (3, 4)),
                                               (12, 12, 36, (6, 6)), (4, 3, 4, (2, 2)), (1, 10, 3, (1, 3)),
                                               (10, 1, 3, (3, 1)), (6, 6, 1, (1, 1))])
def test_downsample_sub_grid_known_answers(h, w, k, expected):
    from vlmfast.pruners.downsample import sub_grid

    assert sub_grid(h, w, k) == expected and expected[0] * expected[1] <= k


def test_downsample_places_features_at_cell_centres():
    from vlmfast.pruners import Downsample

    asked = []

    def resample(grid):
        asked.append(grid)
        return torch.full((grid[0] * grid[1], 3), 7.0)

    feats = torch.arange(48, dtype=torch.float32)[:, None].repeat(1, 3)
    img = ImageTokens(features=feats[:16], grid=(1, 4, 4), resample=resample)
    keep, out, _ = Downsample(keep=0.25).prune(img)
    assert asked == [(2, 2)] and keep.tolist() == [5, 7, 13, 15] and torch.equal(out, torch.full((4, 3), 7.0))
    # a 3 x 6 grid, budget 9: 2 rows (floor(sqrt(9 * 3 / 6))) x 4 columns, centres of 1.5 x 1.5 cells
    img = ImageTokens(features=feats[:18], grid=(1, 3, 6), resample=resample)
    keep, _, _ = Downsample(keep=0.5).prune(img)
    assert asked[-1] == (2, 4) and keep.tolist() == [0, 2, 3, 5, 12, 14, 15, 17]


def test_downsample_keep_all_is_the_towers_own_and_a_video_is_refused():
    from vlmfast.errors import InputError
    from vlmfast.pruners import Downsample

    def never(grid):
        raise AssertionError("keep = 1 must not resize")

    feats = torch.randn(16, 3)
    keep, out, _ = Downsample(keep=1.0).prune(ImageTokens(features=feats, grid=(1, 4, 4), resample=never))
    assert keep.tolist() == list(range(16)) and torch.equal(out, feats)
    video = ImageTokens(features=torch.randn(32, 3), grid=(2, 4, 4), kind="video")
    with pytest.raises(InputError, match="videos are not supported"):
        Downsample(keep=0.25).prune_visual(video)
