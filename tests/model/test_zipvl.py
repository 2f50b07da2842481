"""ZipVL: important-token selection on hand-made attention, KV quantization, the cache transforms."""

from __future__ import annotations

import pytest
import torch
from conftest import make_image

from vlmfast import Policy, PolicyError, VLMAccelerator
from vlmfast.kv_quant import Quantized
from vlmfast.pruners import FastV, FoPru, ZipVL
from vlmfast.pruners.zipvl import important_tokens, probe_indices

PROMPT = "what is in the image ?"


def test_probe_indices_recent_window_plus_spread():
    p = probe_indices(100, 0.05).tolist()
    assert p[-5:] == [95, 96, 97, 98, 99] and len(p) == 10 and p[0] == 0


def test_important_tokens_follow_the_attention_mass():
    n, d = 40, 8
    k = torch.zeros(1, 1, n, d)
    k[0, 0, :, 0] = -1.0
    k[0, 0, [3, 17, 25], 0] = 1.0  # three keys every probe prefers (e^8 : 1)
    q = torch.zeros(1, 1, n, d)
    q[0, 0, :, 0] = 4.0
    valid = torch.ones(1, n, dtype=torch.bool)
    imp = important_tokens(q, k, 1.0, valid, tau=0.9, probe=0.05)
    recent = set(range(38, 40))
    assert {3, 17, 25} <= set(imp[0].nonzero().squeeze(1).tolist())
    assert set(imp[0].nonzero().squeeze(1).tolist()) <= {3, 17, 25} | recent | set(range(0, 3))
    full = important_tokens(q, k, 1.0, valid, tau=1.0, probe=0.05)
    assert int(full.sum()) == n  # all of the mass needs every key
    assert int(imp.sum()) < n


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantization_error_within_half_a_step(bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 7, 64, generator=g)
    q = Quantized(x, bits, 32)
    groups = x.reshape(-1, 32)
    step = (groups.max(1).values - groups.min(1).values) / ((1 << bits) - 1)
    err = (q.dequantize() - x).reshape(-1, 32).abs().max(1).values
    assert bool((err <= step / 2 + 2e-3 * step.clamp(min=1) + 1e-3).all())
    assert q.nbytes() == x.numel() * bits // 8 + 4 * (x.numel() // 32)


def acc(tiny, *methods):
    model, processor = tiny
    return VLMAccelerator(model, processor, policy=Policy(list(methods)))


def test_tau_one_without_kv_change_is_identity(tiny):
    img = make_image(31)
    base = acc(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    out = acc(tiny, ZipVL(tau=1.0, kv="none")).generate(images=[img], prompt=PROMPT, max_new_tokens=8)
    assert out.token_ids == base.token_ids
    assert out.stats.stages[-1]["important_share"] == 1.0


def test_mixed_precision_kv_cuts_bytes(tiny):
    img = make_image(32)
    base = acc(tiny).generate(images=[img], prompt=PROMPT, max_new_tokens=4)
    out = acc(tiny, ZipVL(kv="quantize", group=8)).generate(images=[img], prompt=PROMPT, max_new_tokens=4)
    # fp32 tiny models: 4-bit/2-bit codes + fp16 scales per 8 values is well under half
    assert out.stats.kv_bytes < 0.5 * base.stats.kv_bytes
    share = out.stats.stages[-1]["important_share"]
    assert 0 < share <= 1


def test_eviction_shrinks_cache_and_batch_equals_alone(tiny, family):
    z = ZipVL(tau=0.8, kv="evict")
    a = acc(tiny, FoPru(keep=0.5), z)
    reqs = [([make_image(33)], PROMPT), ([make_image(34), make_image(35)], "describe this picture in detail please")]
    alone = [a.generate(images=i, prompt=p, max_new_tokens=5) for i, p in reqs]
    batch = a.generate(images=[r[0] for r in reqs], prompt=[r[1] for r in reqs], max_new_tokens=5)
    for x, y in zip(alone, batch):
        assert x.token_ids == y.token_ids
    full = acc(tiny, FoPru(keep=0.5)).generate(images=[make_image(33)], prompt=PROMPT, max_new_tokens=5)
    assert alone[0].stats.kv_bytes < full.stats.kv_bytes


def test_zipvl_with_layer_pruner_is_refused():
    with pytest.raises(PolicyError, match="cannot be combined with layer-stage"):
        Policy([ZipVL(), FastV(layer=2)])
