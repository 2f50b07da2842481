"""The method contract as a third party meets it: one dataclass registered by name, a run started from the
request, the request's public assembly API (what decode branches use)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from conftest import make_image

from vlmfast import (
    AttentionMethod,
    Policy,
    Request,
    Run,
    VisionPruner,
    VLMAccelerator,
    available_methods,
    method_dataclass,
    register,
)
from vlmfast.request import assemble, encode, prune_visual


@register("test-norm")
@method_dataclass
class NormPruner(VisionPruner):  # the README's example
    keep: float = 0.25
    needs_attention = False

    def select(self, image):
        k = max(1, int(image.n_tokens * self.keep))
        return image.features.norm(dim=-1).topk(k).indices.sort().values


class _Recording(Run):
    def __init__(self, seen: dict):
        self.seen = seen

    def register(self, session) -> None:
        self.seen["registered"] = True

    @contextmanager
    def hooks(self, layers):
        self.seen["hooks_in"] = True
        try:
            yield
        finally:
            self.seen["hooks_out"] = True

    def transform_cache(self, cache) -> None:
        self.seen["cache_len"] = cache.get_seq_length()

    def report(self, b: int) -> dict:
        return {"stage": "attention", "method": "test-record", "row": b}


SEEN: dict = {}


@register("test-record")
@method_dataclass
class Recorder(AttentionMethod):
    def start(self, request: Request) -> Run:
        SEEN["request"] = request
        return _Recording(SEEN)


def test_a_registered_third_party_pruner_runs_from_a_policy_file(tiny):
    model, processor = tiny
    assert "test-norm" in available_methods()
    acc = VLMAccelerator(model, processor, policy={"methods": [{"method": "test-norm", "keep": 0.5}]})
    out = acc.generate(images=[make_image(3)], prompt="what is it ?", max_new_tokens=2)
    assert out.stats.visual_tokens_kept == out.stats.visual_tokens_in // 2
    assert out.stats.stages[0]["method"] == "test-norm"


def test_a_run_starts_from_the_request_and_takes_part_in_every_step(tiny):
    model, processor = tiny
    SEEN.clear()
    acc = VLMAccelerator(model, processor, policy=Policy([NormPruner(keep=0.5), Recorder()]))
    outs = acc.generate(images=[[make_image(4)], [make_image(5, size=80)]], prompt=["what is it ?", "and this ?"],
                        max_new_tokens=2)
    req = SEEN["request"]
    assert SEEN["registered"] and SEEN["hooks_in"] and SEEN["hooks_out"]
    assert SEEN["cache_len"] == req.valid.shape[1]  # after prefill, before decoding
    views = len(req.kept) // 2  # visual inputs per image (LLaVA-NeXT: two views)
    assert req.counts == [views, views] and list(req.own(1)) == list(range(views, 2 * views))
    assert [sum(int(req.kept[i].numel()) for i in req.own(b)) for b in range(2)] == \
        [o.stats.visual_tokens_kept for o in outs]
    assert (req.image_mask & req.valid).sum(1).tolist() == [o.stats.visual_tokens_kept for o in outs]
    assert [o.stats.stages[-1] for o in outs] == [{"stage": "attention", "method": "test-record", "row": b}
                                                  for b in range(2)]


def test_the_public_assembly_api_rebuilds_the_request(tiny):
    """request.assemble(all tokens) is the unpruned sequence; reducing every image to one token keeps that
    token's position; encode -> prune_visual -> assemble without a pruner gives the model's own embeddings."""
    model, processor = tiny
    SEEN.clear()
    acc = VLMAccelerator(model, processor, policy=Policy([NormPruner(keep=0.5), Recorder()]))
    acc.generate(images=[make_image(6)], prompt="what is it ?", max_new_tokens=1)
    req: Request = SEEN["request"]
    enc = req.encoded
    with torch.inference_mode():  # as inside a call (the request's tensors are inference tensors)
        full = req.assemble([torch.arange(v.n_tokens) for v in enc.visual])
        one = req.assemble([torch.tensor([2]) for _ in enc.visual])
    assert full.mask.shape == enc.inputs["attention_mask"].shape and torch.equal(full.positions, enc.positions)
    first = int(enc.image_mask[0].nonzero()[0])
    assert int((one.image_mask & one.valid).sum()) == len(enc.visual)  # one per view
    assert int(one.positions[0, 0][one.image_mask[0]][0].item()) == int(enc.positions[0, 0, first + 2])
    with torch.inference_mode():
        again = encode(acc.adapter, processor, [[make_image(6)]], ["what is it ?"])
        visual, kept, _ = prune_visual(None, again.visual)
        seq = assemble(model, again, visual, kept)
        ref = model.get_input_embeddings()(again.inputs["input_ids"])
    fixed = again.fixed_mask if again.fixed_mask is not None else torch.zeros_like(again.image_mask)
    text = ~again.image_mask & ~fixed  # never-pruned visual tokens (LLaVA-NeXT's newlines) carry their features
    assert torch.equal(seq.embeds[text], ref[text])
    if fixed.any():
        assert torch.equal(seq.embeds[fixed], torch.cat([v.fixed for v in again.visual if v.fixed is not None]))
    assert torch.equal(seq.embeds[again.image_mask], torch.cat([v.features for v in again.visual]).to(ref.dtype))


def test_a_pruner_that_asks_for_the_instruction_gets_its_own_samples_prompt(tiny):
    """encode(instruction=True): every visual input (each view) carries its own sample's prompt as the language
    model's input embeddings of a run of that sample's tokens, without the chat template; none without the flag."""
    model, processor = tiny
    acc = VLMAccelerator(model, processor, policy=None)
    prompts = ["what colour is the circle ?", "how many objects are there"]
    images = [[make_image(7)], [make_image(8), make_image(9)]]
    with torch.inference_mode():
        enc = encode(acc.adapter, processor, images, prompts, instruction=True)
        plain = encode(acc.adapter, processor, images, prompts)
        embeds = model.get_input_embeddings()(enc.inputs["input_ids"])
    assert all(v.instruction is None for v in plain.visual)
    assert sorted(set(enc.owner)) == [0, 1] and len(enc.visual) == len(plain.visual)
    for v, b in zip(enc.visual, enc.owner):
        m = len(prompts[b].split())  # the tiny tokenizers are word-level: one token a word
        assert v.instruction is not None and v.instruction.shape == (m, embeds.shape[-1])
        runs = [s for s in range(embeds.shape[1] - m + 1) if torch.equal(embeds[b, s:s + m], v.instruction)]
        assert len(runs) == 1  # the prompt's own tokens, found once in its own sample's sequence
        assert not torch.equal(v.instruction, enc.visual[len(enc.visual) - 1 if b == 0 else 0].instruction)
