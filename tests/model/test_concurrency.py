"""Several threads, each with its own VLMAccelerator over one shared model: every call gets what it gets alone.

A call installs hooks, the attention implementation and per-request state on the model's shared modules, so
calls on one model are serialised by a per-model lock (vlmfast.accelerator.model_lock); without it 39 of 48 such
calls raised (issue 23)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from conftest import make_image

from vlmfast import FastV, FoPru, Policy, VLMAccelerator
from vlmfast.accelerator import model_lock

POLICIES = [Policy([FoPru(keep=0.5)]), Policy([FastV(layer=1, keep=0.5)]), None, Policy([FoPru(keep=0.25, layer=0)])]
CALLS = 12


def _job(acc: VLMAccelerator, i: int) -> list[int]:
    out = acc.generate(images=[make_image(i % 5)], prompt=f"what is in the image {i % 3} ?", max_new_tokens=4)
    return out.token_ids


def test_four_threads_by_twelve_calls_on_one_model_equal_serial_runs(models):
    model, processor = models["llava"]
    accs = [VLMAccelerator(model, processor, policy=p) for p in POLICIES]
    serial = [[_job(acc, i) for i in range(CALLS)] for acc in accs]
    start = threading.Barrier(len(accs))

    def worker(k: int) -> list[list[int]]:
        start.wait()
        return [_job(accs[k], i) for i in range(CALLS)]

    with ThreadPoolExecutor(len(accs)) as pool:
        threaded = list(pool.map(worker, range(len(accs))))
    assert sum(len(t) for t in threaded) == 48
    assert threaded == serial
    for k in range(len(accs)):  # the model is as it was after all of them
        assert accs[k].model.config.get_text_config()._attn_implementation == "sdpa"


def test_the_lock_is_one_per_model_and_reentrant(models):
    a, b = models["llava"][0], models["qwen2_vl"][0]
    assert model_lock(a) is model_lock(a) and model_lock(a) is not model_lock(b)
    with model_lock(a), model_lock(a):  # a decode branch or a nested helper on the same thread does not deadlock
        pass
