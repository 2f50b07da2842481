"""The shared matrix every pruner goes through, on both families: keep-all identity, order and exact
counts, batch == alone. New methods are added to METHODS."""

from __future__ import annotations

import pytest
from conftest import make_image

from vlmfast import Policy, VLMAccelerator
from vlmfast.pruners import (
    CDPruner,
    DivPrune,
    Downsample,
    FasterVLM,
    FastV,
    FoPru,
    PyramidDrop,
    RandomPruner,
    VFlowOpt,
    VisionZip,
    n_keep,
)
from vlmfast.pruners.downsample import sub_grid

PROMPT = "what is in the image ?"
METHODS = {
    "fopru-rank": lambda k: FoPru(keep=k),
    "fopru-row": lambda k: FoPru(keep=k, strategy="row"),
    "fastervlm": lambda k: FasterVLM(keep=k),
    "visionzip": lambda k: VisionZip(keep=k),
    "divprune": lambda k: DivPrune(keep=k),
    "cdpruner": lambda k: CDPruner(keep=k),
    "downsample": lambda k: Downsample(keep=k),
    "random": lambda k: RandomPruner(keep=k, seed=1),
    "fastv": lambda k: FastV(layer=2, keep=k),
    "pyramiddrop": lambda k: PyramidDrop(layers=[1, 2, 3], ratio=k ** (1 / 3)),
    "vflowopt": lambda k: VFlowOpt(keep=min(1.0, 2 * k), m=2.0, llm_layers=[2], llm_keep=[0.5 if k < 1 else 1.0]),
}


def acc(tiny, method):
    model, processor = tiny
    reason = VLMAccelerator(model, processor, policy=None).adapter.resample_unsupported
    if isinstance(method, Downsample) and reason:  # refused with a PolicyError (tests/model/test_downsample.py)
        pytest.skip(f"downsample: {reason}")
    return VLMAccelerator(model, processor, policy=Policy([method] if method else []))


@pytest.fixture(params=sorted(METHODS))
def name(request):
    return request.param


def test_keep_all_is_identity(tiny, name):
    img = make_image(21)
    base = acc(tiny, None).generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    out = acc(tiny, METHODS[name](1.0)).generate(images=[img], prompt=PROMPT, max_new_tokens=6)
    assert out.token_ids == base.token_ids


@pytest.mark.parametrize("keep", [0.5, 0.25, 0.1])
def test_order_and_exact_counts(tiny, name, keep):
    method = METHODS[name](keep)
    out = acc(tiny, method).generate(images=[make_image(22)], prompt=PROMPT, max_new_tokens=2)
    n = out.stats.visual_tokens_in
    if name == "fopru-row":
        side = int(n ** 0.5) if n == int(n ** 0.5) ** 2 else None
        assert out.stats.visual_tokens_final % (side or 1) == 0
    elif name == "vflowopt":  # vision stage keeps <= floor(n * 2k) (recycled cells included), then half
        at_llm = out.stats.visual_tokens_kept
        assert n_keep(n, 2 * keep) - int(n / 4) <= at_llm <= n_keep(n, 2 * keep)
        assert out.stats.visual_tokens_final == n_keep(at_llm, 0.5)
    elif name == "pyramiddrop":
        left = n
        for _ in range(3):
            left = n_keep(left, method.ratio)
        assert out.stats.visual_tokens_final == left
        assert [s["visual_tokens_kept"] for s in out.stats.stages][-1] == left and len(out.stats.stages) == 3
    elif name == "downsample":  # the largest sub-grid within the budget (square test images)
        rows, cols = sub_grid(int(n ** 0.5), int(n ** 0.5), n_keep(n, keep))
        assert int(n ** 0.5) ** 2 == n and out.stats.visual_tokens_final == rows * cols
    else:
        assert out.stats.visual_tokens_final == n_keep(n, keep)
    if method.stage == "vision":  # one kept list per visual input (per view of a multi-view image)
        for kept in out.kept:
            assert kept.tolist() == sorted(set(kept.tolist()))
        assert out.stats.visual_tokens_kept == sum(k.numel() for k in out.kept)


def test_batch_equals_alone(tiny, family, name):
    a = acc(tiny, METHODS[name](0.25))
    reqs = [([make_image(23)], PROMPT),
            ([make_image(24), make_image(25, size=112, width=84 if family == "qwen2_vl" else 112)],
             "describe this picture in detail please")]
    alone = [a.generate(images=i, prompt=p, max_new_tokens=5) for i, p in reqs]
    batch = a.generate(images=[r[0] for r in reqs], prompt=[r[1] for r in reqs], max_new_tokens=5)
    for x, y in zip(alone, batch):
        assert x.token_ids == y.token_ids and x.stats.visual_tokens_final == y.stats.visual_tokens_final
