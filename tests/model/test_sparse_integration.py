"""mminference in the accelerator: selected by a policy, dispatched per layer and head from vlmfast's attention
function, composed with pruning, dense below min_length, and equal to dense attention on each head's mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_image

from vlmfast import VLMAccelerator
from vlmfast.errors import PolicyError
from vlmfast.policy import Policy
from vlmfast.pruners import FastV, FoPru
from vlmfast.sparse import AShape, Dense, Grid, MMInference, QBoundary, VerticalSlash
from vlmfast.sparse.kernels import masked_reference
from vlmfast.sparse.layout import Layout, Span
from vlmfast.sparse.method import SparseRun
from vlmfast.sparse.patterns import HeadContext

IMAGES = [make_image(i) for i in range(3)]
PROMPT = "what is in the image ?"


def generate(model, processor, methods, **kw):
    return VLMAccelerator(model, processor, policy=Policy(methods)).generate(images=IMAGES, prompt=PROMPT,
                                                                             max_new_tokens=6, **kw)


def sparse_report(out) -> dict:
    return next(s for s in out.stats.stages if s.get("method") == "mminference")


def test_dense_pattern_gives_the_plain_tokens(tiny):
    model, processor = tiny
    plain = generate(model, processor, [])
    out = generate(model, processor, [MMInference(min_length=0, default=Dense())])
    assert out.token_ids == plain.token_ids
    rep = sparse_report(out)
    assert rep["sparse_layers"] == model.config.get_text_config().num_hidden_layers and not rep["dense_fallbacks"]


def test_below_min_length_runs_dense_and_says_so(tiny):
    model, processor = tiny
    plain = generate(model, processor, [])
    out = generate(model, processor, [MMInference(default=VerticalSlash(vertical=4, slash=4))])  # min_length 8192
    assert out.token_ids == plain.token_ids
    rep = sparse_report(out)
    assert rep["sparse_layers"] == 0 and "shorter than min_length=8192" in rep["dense_fallbacks"]


@pytest.mark.parametrize("pruner", [None, FoPru(keep=0.5), FastV(layer=2, keep=0.5)], ids=["none", "fopru", "fastv"])
def test_sparse_runs_over_the_kept_tokens(tiny, pruner):
    model, processor = tiny
    sparse = MMInference(min_length=0, block=16, default=Grid(stride="row", local=16))
    out = generate(model, processor, [pruner, sparse] if pruner else [sparse])
    rep = sparse_report(out)
    n_layers = model.config.get_text_config().num_hidden_layers
    assert rep["sparse_layers"] == n_layers and not rep["dense_fallbacks"]
    assert rep["head_patterns"] == {"grid": n_layers * model.config.get_text_config().num_attention_heads}
    assert model.config.get_text_config()._attn_implementation in ("sdpa", "eager")  # restored after the call


class _Module:
    layer_idx = 0
    scaling = 0.25


@pytest.mark.parametrize("pattern", [Grid(stride="row", local=8), VerticalSlash(vertical=6, slash=6, last_q=4),
                                     QBoundary(vertical=5, slash=5, last_q=4), AShape(sink=4, local=8)],
                         ids=lambda p: p.pattern)
def test_dispatch_equals_dense_on_each_heads_mask(pattern):
    """A left-padded batch of two rows with different layouts, GQA: every head of every row equals dense
    attention restricted to the mask its pattern gives on that row's own tokens."""
    torch.manual_seed(0)
    bsz, h, hkv, length, d = 2, 4, 2, 60, 16
    valid = torch.ones(bsz, length, dtype=torch.bool)
    valid[1, :11] = False  # left padding
    layouts = [Layout(length, [Span(5, (2, 3, 4), torch.arange(24)), Span(33, (1, 4, 4), torch.arange(16))]),
               Layout(length, [Span(15, (1, 5, 5), torch.arange(25))])]
    method = MMInference(min_length=0, block=16, default=pattern)
    run = SparseRun(method, layouts, valid, n_layers=1)
    q, k, v = torch.randn(bsz, h, length, d), torch.randn(bsz, hkv, length, d), torch.randn(bsz, hkv, length, d)

    def base(*a, **kw):
        raise AssertionError("the dense kernel must not be called")

    out, _ = run._attention(_Module(), q, k, v, None, base, scaling=0.25)
    for b in range(bsz):
        idx = valid[b].nonzero().squeeze(1)
        lay = layouts[b].subset(idx)
        cache: dict = {}
        for head in range(h):
            qb, kb, vb = q[b, head, idx], k[b, head // 2, idx], v[b, head // 2, idx]
            spec = pattern.build(HeadContext(qb, kb, lay, 16, 0.25, cache))
            ref, _ = masked_reference(qb, kb, vb, spec.dense(), 0.25)
            assert (out[b, idx, head].double() - ref).abs().max() < 2e-6
    assert run.report(0)["sparse_layers"] == 1


def test_policy_dict_roundtrip_and_limits():
    data = {"methods": [{"method": "fopru", "keep": 0.5},
                        {"method": "mminference", "min_length": 0, "default": {"pattern": "a_shape", "sink": 4}}]}
    pol = Policy.from_dict(data)
    assert isinstance(pol.methods[1].default, AShape) and pol.sparse_prefill == [pol.methods[1]]
    assert Policy.from_dict(pol.to_dict()) == pol
    with pytest.raises(PolicyError, match="at most one sparse prefill"):
        Policy([MMInference(), MMInference()])
    with pytest.raises(PolicyError, match="default"):
        Policy.from_dict({"methods": [{"method": "mminference", "default": {"pattern": "spiral"}}]})


def test_shipped_head_file_and_policy_load():
    from vlmfast.policy import load_policy

    pol = load_policy("tiny-llava-shapes-sparse")
    m = pol.sparse_prefill[0]
    patterns = m.head_patterns()
    assert patterns is not None and len(patterns.layers) == 4
    assert all(len(layer) == 4 for layer in patterns.layers)


def test_qwen2_vl_video_layout_and_sparse_prefill(models):
    """Video frames through the Qwen2-VL processor: one span with the (t, h, w) grid in LLM tokens; a sparse
    prefill on it with a dense pattern equals the plain forward."""
    from vlmfast import attention
    from vlmfast.bench.sparse import video_inputs, video_layout_from_inputs

    model, processor = models["qwen2_vl"]
    inputs = video_inputs(processor, frames=8, size=112)
    layout = video_layout_from_inputs(model, inputs)
    (span,) = layout.spans
    t, hh, ww = (int(x) for x in inputs["video_grid_thw"][0])
    assert span.grid == (t, hh // 2, ww // 2) and span.frame_stride == (hh // 2) * (ww // 2)
    assert span.kind == "video" and span.end - span.start == t * hh * ww // 4
    n_layers = model.config.get_text_config().num_hidden_layers
    with torch.inference_mode():
        plain = model(**inputs, logits_to_keep=1).logits
        for pattern in (Dense(), Grid(stride="frame", local=16)):
            run = SparseRun(MMInference(min_length=0, block=16, default=pattern), [layout],
                            inputs["attention_mask"].bool(), n_layers)
            session = attention.AttentionSession(base="")
            run.register(session)
            with attention.installed(model, session):
                logits = model(**inputs, logits_to_keep=1).logits
            assert run.sparse_calls == n_layers
            if isinstance(pattern, Dense):
                assert (logits - plain).abs().max() < 1e-4
    assert np.isfinite(logits.numpy()).all()


E2E_KEYS = ("seq_len", "video_frames", "visual_tokens", "dense_s", "sparse_s", "speedup", "ideal_speedup",
            "attention_share", "density", "attention_share_qwen2_vl_7b", "ideal_speedup_qwen2_vl_7b",
            "logits_max_abs_diff", "proxy", "repeats", "efficiency", "path")


def test_bench_sparse_end_to_end_goes_through_generate_videos():
    """The quick proxy on a ~1.5k-token video through ``VLMAccelerator.generate(videos=...)``: the row reports the
    density the sparse run used (its stats' stage entry: below 1 at this length, the grid heads' lines) and the
    sequence the processor built (the same tokens as ``video_inputs``)."""
    from vlmfast.bench.sparse import end_to_end_rows, quick_proxy_spec, video_inputs
    from vlmfast.zoo.tiny import tiny_qwen2_vl

    (row,) = end_to_end_rows(seq_lens=(1500,), repeats=1, block=64, spec=quick_proxy_spec(), log=lambda *a: None)
    assert set(row) == set(E2E_KEYS) and row["path"] == "VLMAccelerator.generate(videos=...)"
    assert 0 < row["density"] < 1 and row["ideal_speedup"] > 1 and 0 < row["attention_share"] < 1
    assert 0 < row["logits_max_abs_diff"] < 1 and row["dense_s"] > 0 and row["sparse_s"] > 0
    model, processor = tiny_qwen2_vl(quick_proxy_spec())
    ids = video_inputs(processor, row["video_frames"], quick_proxy_spec().image_size)["input_ids"]
    assert row["seq_len"] == ids.shape[1] and row["visual_tokens"] == int((ids == model.config.video_token_id).sum())


@pytest.mark.slow
def test_bench_sparse_quick_writes_the_issue_schema(tmp_path):
    import json

    from vlmfast.cli import main

    path = tmp_path / "bench_sparse.json"
    assert main(["bench", "sparse", "--quick", "--json", str(path)]) == 0
    data = json.loads(path.read_text())
    for key in ("seq_len", "density", "sdpa_s", "flex_s", "vlmfast_s", "speedup", "ideal_speedup", "recall"):
        assert key in data["kernel"][0]
    assert set(data["end_to_end"][0]) == set(E2E_KEYS)
    assert 0 < data["kernel"][0]["density"] <= 1 and 0 < data["end_to_end"][0]["attention_share"] < 1
