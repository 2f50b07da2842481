"""One request's state, and the steps every path through a request shares (the main call, decode branches).

The walk (docs/architecture.md): :func:`encode` (the processor, the vision tower once) -> :func:`prune_visual`
(the policy's vision pruner, per visual input) -> :func:`assemble` (the sequence the language model receives)
-> prefill -> :func:`decode_step` per token. :class:`Request` holds what those steps produced for one call; every
method's run starts from it (``method.start(request)``) and decode branches build their inputs with
:meth:`Request.assemble` / :meth:`Request.encode` (DAMRO, AGLA).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from typing import Any, NamedTuple

import torch

from ._compat import CACHE_KW
from .adapters.base import Adapter, ImageTokens
from .budget import split_budget
from .errors import InputError
from .layer_stage import gather_seq
from .stats import now


class Encoded(NamedTuple):
    """A batch of prompts through the model's processor and vision tower (nothing pruned yet)."""

    inputs: dict
    """the processor's outputs (left padded)"""
    image_mask: torch.Tensor
    """(B, L) True at every visual placeholder (image and video tokens)"""
    positions: torch.Tensor
    """(R, B, L) positions of the unpruned sequence (row 0: 1-D; Qwen's M-RoPE rows after it)"""
    visual: list[ImageTokens]
    """one per visual input, in sequence order (per sample: its images, then its videos)"""
    prepare_s: float = 0.0
    """seconds the processor took (the rest of :func:`encode` is the vision tower)"""
    fixed_mask: torch.Tensor | None = None
    """(B, L) True at placeholders of never-pruned visual tokens (``ImageTokens.fixed``), or None"""
    owner: tuple[int, ...] = ()
    """per visual input, its sample"""
    source: tuple[int, ...] = ()
    """per visual input, the index of its image (or video: after the sample's images) in its sample; the views of
    one image share it"""


class Assembled(NamedTuple):
    """The sequence the language model receives: embeddings with the visual features scattered in, the unkept
    visual tokens dropped, re-padded on the left; kept tokens keep their original positions."""

    embeds: torch.Tensor
    mask: torch.Tensor
    positions: torch.Tensor
    image_mask: torch.Tensor
    deepstack: torch.Tensor | None = None
    """(levels, V, d): the kept visual tokens' DeepStack rows (Qwen3-VL), one per True of ``image_mask``, row-major"""

    @property
    def valid(self) -> torch.Tensor:
        return self.mask.bool()


def view_groups(visual: list[ImageTokens]) -> list[range]:
    """The index range of each image (or video) in ``visual``: a view 0 and the further views right after it."""
    starts = [i for i, v in enumerate(visual) if v.view == 0 or i == 0] + [len(visual)]
    return [range(a, b) for a, b in zip(starts[:-1], starts[1:])]


def sequence_order(images: list, videos: list, batch_images: list[list],
                   batch_videos: list[list]) -> tuple[list, tuple[int, ...], tuple[int, ...]]:
    """The adapter's images and videos (each in request order; an image's further views right after its first)
    interleaved in sequence order: per sample its images, then its videos (the order ``prepare`` puts them in the
    prompt). Returns (the visual inputs, the sample of each, the index of each one's image or video in its sample:
    images first, then videos)."""
    groups = [images[r.start:r.stop] for r in view_groups(images)]
    if len(groups) != sum(len(i) for i in batch_images):
        raise RuntimeError(f"the adapter gave {len(groups)} images for {sum(len(i) for i in batch_images)} passed")
    it_i, it_v = iter(groups), iter(videos)
    out: list = []
    owner: list[int] = []
    source: list[int] = []
    for b, (imgs, vids) in enumerate(zip(batch_images, batch_videos)):
        for j in range(len(imgs)):
            views = next(it_i)
            out += views
            owner += [b] * len(views)
            source += [j] * len(views)
        for j in range(len(vids)):
            out.append(next(it_v))
            owner.append(b)
            source.append(len(imgs) + j)
    return out, tuple(owner), tuple(source)


def encode(adapter: Adapter, processor, batch_images: list[list], prompts: list[str],
           batch_videos: list[list] | None = None, attention_layer: int | None = None,
           grey: bool = False, means_only: bool = False, instruction: bool = False,
           resample: bool = False) -> Encoded:
    """Tokenise with the model's own processor and run the vision tower once (reading ``attention_layer``'s
    attention, only its column and row means with ``means_only``, and the pixels' grey values when asked; with
    ``instruction``, each visual input carries its sample's :func:`instruction_embeddings`; with ``resample``, each
    image its ``ImageTokens.resample``)."""
    batch_videos = batch_videos or [[] for _ in prompts]
    t0 = now(adapter.model.device)
    inputs = adapter.prepare(processor, batch_images, prompts, videos=batch_videos if any(batch_videos) else None)
    prepare_s = now(adapter.model.device) - t0
    image_mask = adapter.image_token_mask(inputs)
    positions = adapter.positions(inputs)
    limit = context_length(adapter)
    if limit is not None and int(positions.max()) + 1 > limit:
        raise InputError(f"the prompt needs {int(positions.max()) + 1} positions (its text, the chat template and the "
                         f"visual tokens) but the language model has {limit} (max_position_embeddings); shorten the "
                         "prompt or pass fewer or smaller images")
    images, videos = adapter.visual_tokens(inputs, attention_layer, grey, means_only)
    if resample and not adapter.resample_unsupported:
        images = [replace(v, resample=partial(adapter.resampled_features, inputs, i)) for i, v in enumerate(images)]
    visual, owner, source = sequence_order(images, videos, batch_images, batch_videos)
    fixed_mask = adapter.fixed_token_mask(inputs)
    n_feat = sum(v.n_tokens for v in visual) + sum(0 if v.fixed is None else v.fixed.shape[0] for v in visual)
    n_slots = int(image_mask.sum()) + (0 if fixed_mask is None else int(fixed_mask.sum()))
    if n_feat != n_slots:
        raise InputError(f"the processor produced {n_slots} image placeholders but the vision "
                         f"tower {n_feat} features; check the processor matches the model")
    if instruction:
        texts = instruction_embeddings(adapter.model, processor, prompts)
        visual = [replace(v, instruction=texts[b]) for v, b in zip(visual, owner)]
    return Encoded(inputs, image_mask, positions, visual, prepare_s, fixed_mask, owner, source)


def instruction_embeddings(model, processor, prompts: list[str]) -> list[torch.Tensor]:
    """Per prompt, its tokens (the processor's tokenizer, no special tokens, no chat template) through the language
    model's input embedding layer: (m, d_model), m = 0 for an empty prompt. What an instruction-conditioned vision
    pruner compares the visual tokens with (``ImageTokens.instruction``); family-neutral: every processor has a
    tokenizer and every model ``get_input_embeddings``."""
    embed = model.get_input_embeddings()
    device = embed.weight.device
    out = []
    for p in prompts:
        ids = processor.tokenizer(p, add_special_tokens=False)["input_ids"]
        out.append(embed(torch.tensor(ids, dtype=torch.long, device=device)))
    return out


def context_length(adapter: Adapter) -> int | None:
    """The language model's context (``max_position_embeddings``), or None when its config does not say."""
    limit = getattr(adapter.text_config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else None


def prune_visual(pruner, visual: list[ImageTokens]) -> tuple[list[ImageTokens], list[torch.Tensor],
                                                              list[torch.Tensor | None]]:
    """Apply a vision pruner (or none) to every visual input: (what enters the language model, with merged
    features written at kept positions; the kept indices, ascending; per kept token scores or None). The inputs
    are not modified."""
    if pruner is None:
        return list(visual), [torch.arange(v.n_tokens, device=v.features.device) for v in visual], [None] * len(visual)
    out, kept, scores = [], [], []
    per_view = _view_pruners(pruner, visual)
    for v, p in zip(visual, per_view):
        res = p.prune_visual(v)  # a video: per frame group
        out.append(replace(v, features=v.features.index_copy(0, res.keep, res.features.to(v.features.dtype))))
        kept.append(res.keep)
        scores.append(res.scores)
    return out, kept, scores


def _view_pruners(pruner, visual: list[ImageTokens]) -> list:
    """The pruner for each visual input: itself, except for the views of a multi-view image, which get copies whose
    ``keep`` gives each view its share of the image's budget (:func:`~vlmfast.budget.split_budget`, split by the
    pruner's ``view_budget``)."""
    out = [pruner] * len(visual)
    keep = getattr(pruner, "keep", None)
    if not isinstance(keep, float) or keep >= 1.0:
        return out
    for group in view_groups(visual):
        if len(group) > 1:
            sizes = [visual[i].n_tokens for i in group]
            for i, n, k in zip(group, sizes, split_budget(sizes, keep, pruner.view_budget)):
                out[i] = replace(pruner, keep=k / n)
    return out


def assemble(model, encoded: Encoded, visual: list[ImageTokens], kept: list[torch.Tensor]) -> Assembled:
    """Embed the prompt, scatter the visual features where the model would (``masked_scatter``), drop the unkept
    visual tokens and re-pad on the left (kept tokens keep their order and their original positions)."""
    input_ids, mask = encoded.inputs["input_ids"], encoded.inputs["attention_mask"]
    image_mask, positions = encoded.image_mask, encoded.positions
    embeds = model.get_input_embeddings()(input_ids)
    if visual:
        feats = torch.cat([v.features for v in visual]).to(embeds.dtype)
        embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats)
    fixed = [v.fixed for v in visual if v.fixed is not None]
    if encoded.fixed_mask is not None and fixed:  # never-pruned visual tokens: kept like text, at their positions
        embeds = embeds.masked_scatter(encoded.fixed_mask.unsqueeze(-1), torch.cat(fixed).to(embeds.dtype))
    deep = [v.deepstack for v in visual if v.deepstack is not None]
    # the same rows of every level as of the features (visual inputs in sequence order, as the scatter)
    deepstack = torch.cat([d[:, k] for d, k in zip(deep, kept)], 1) if deep and len(deep) == len(visual) else None
    if all(k.numel() == v.n_tokens for k, v in zip(kept, visual)):
        return Assembled(embeds, mask, positions, image_mask, deepstack)
    flat = torch.cat([torch.zeros(v.n_tokens, dtype=torch.bool, device=input_ids.device).index_fill_(0, k, True)
                      for v, k in zip(visual, kept)])
    keep = mask.bool() & ~image_mask
    keep[image_mask] = flat
    width = int(keep.sum(1).max())
    # stable sort puts dropped tokens first and kept tokens last, both in their original order
    idx = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, -width:]
    new_mask = keep.gather(1, idx)
    positions = torch.stack([gather_seq(p, idx) for p in positions]).masked_fill(~new_mask[None], 0)
    return Assembled(gather_seq(embeds, idx), new_mask.to(mask.dtype), positions, image_mask.gather(1, idx) & new_mask,
                     deepstack)


def prefill(model, adapter: Adapter, seq: Assembled, columns=None):
    """The prefill forward of ``seq`` into a new cache (the last position's logits only), with what the family's
    own forward adds to the decoder's hidden states (Qwen3-VL's DeepStack; ``columns``: the layer stage's
    :meth:`~vlmfast.layer_stage.LayerStage.columns`)."""
    with adapter.prefill_hooks(seq.deepstack, seq.image_mask, columns):
        return model(inputs_embeds=seq.embeds, attention_mask=seq.mask,
                     position_ids=adapter.model_position_ids(seq.positions), use_cache=True, logits_to_keep=1)


def next_positions(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(R, B, 1): where decoding continues on every position axis, the *original* maximum + 1 (pruning never makes
    a new token reuse a position)."""
    return positions.masked_fill(~valid[None], -1).amax(-1, keepdim=True) + 1


def decode_step(model, adapter: Adapter, tokens: torch.Tensor, cache, mask: torch.Tensor,
                next_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed one token per row into ``cache``; return (next logits (B, V) float, the longer mask, positions + 1)."""
    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    out = model(input_ids=tokens[:, None], attention_mask=mask, use_cache=True, **{CACHE_KW: cache},
                position_ids=adapter.model_position_ids(next_pos))
    return out.logits[:, -1].float(), mask, next_pos + 1


@dataclass
class Request:
    """What one call knows once the vision stage has run; every method's run starts from it."""

    model: Any
    adapter: Adapter
    processor: Any
    prompts: list[str]
    batch_images: list[list]
    """per sample, its images (PIL, RGB)"""
    batch_videos: list[list]
    """per sample, its videos ((T, H, W, 3) uint8 arrays)"""
    encoded: Encoded
    """the unpruned request (``encoded.visual``: the tower's own features)"""
    visual: list[ImageTokens]
    """what enters the language model per visual input (merged features at kept positions)"""
    kept: list[torch.Tensor]
    """per visual input, the indices of its tokens that enter the language model (ascending)"""
    seq: Assembled
    """the sequence the language model receives"""
    vision_pruner: Any = None
    attention_layer: int | None = None
    """the vision layer whose attention the request read (the pruner's, else DAMRO's), or None"""
    vision_scores: torch.Tensor | None = None
    """(B, L) over ``seq``: the vision pruner's per-token scores, when it gives them (VFlowOpt's layer stages)"""
    stage: Any = None
    """the request's :class:`~vlmfast.layer_stage.LayerStage` (layer pruners; shortened layers' columns)"""

    # -- views -----------------------------------------------------------------------------------------------
    @property
    def inputs(self) -> dict:
        return self.encoded.inputs

    @property
    def image_mask(self) -> torch.Tensor:
        """(B, L) over the sequence the language model receives: its visual tokens."""
        return self.seq.image_mask

    @property
    def valid(self) -> torch.Tensor:
        """(B, L) over the sequence the language model receives: False for left padding."""
        return self.seq.valid

    @property
    def positions(self) -> torch.Tensor:
        return self.seq.positions

    @property
    def counts(self) -> list[int]:
        """visual inputs per sample (an image with several views counts each)"""
        owner = self.encoded.owner
        return [sum(1 for o in owner if o == b) for b in range(len(self.prompts))]

    @property
    def n_layers(self) -> int:
        return len(self.adapter.decoder_layers)

    def own(self, b: int) -> range:
        """The indices of sample ``b``'s visual inputs in ``visual`` / ``kept``."""
        first = sum(self.counts[:b])
        return range(first, first + self.counts[b])

    # -- for decode branches ---------------------------------------------------------------------------------
    def assemble(self, kept: list[torch.Tensor]) -> Assembled:
        """The request with each visual input reduced to ``kept`` (the tower's own features, original positions)."""
        return assemble(self.model, self.encoded, self.encoded.visual, kept)

    def encode(self, batch_images: list[list]) -> tuple[Assembled, list[torch.Tensor], dict]:
        """The same prompts with other images, through the same vision stage and vision pruner: (the sequence,
        the kept indices per image, the processor's inputs)."""
        adapter = self.adapter
        saved = adapter.last_attention_s  # the main request's scoring time stays what it was
        try:
            vp = self.vision_pruner
            enc = encode(adapter, self.processor, batch_images, self.prompts, attention_layer=self.attention_layer,
                         grey=bool(getattr(vp, "needs_grey", False)),
                         means_only=bool(getattr(vp, "reads_attention_means", False)),
                         instruction=bool(getattr(vp, "needs_instruction", False)),
                         resample=bool(getattr(vp, "needs_resample", False)))
        finally:
            adapter.last_attention_s = saved
        visual, kept, _ = prune_visual(self.vision_pruner, enc.visual)
        return assemble(self.model, enc, visual, kept), kept, enc.inputs
