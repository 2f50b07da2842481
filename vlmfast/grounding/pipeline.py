"""One request's grounding, after decoding: phrases -> query rows -> attention flow -> pixel map -> SAM.

Called by :class:`~vlmfast.accelerator.VLMAccelerator` when ``generate(..., ground=True)``; everything it
needs comes from the request (the processor's inputs, the assembled and possibly pruned sequence, the kept
image tokens, the generated tokens) and from the :class:`~.capture.AttentionCapture` that observed the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import InputError, PolicyError
from ..method import Run
from . import Grounding, maps
from .capture import AttentionCapture
from .config import GroundingConfig
from .phrases import find_phrase, object_phrases, token_spans, tokens_in
from .segmenter import ImageEmbeddings, load_predictor, segment_all


def _rgb(image) -> np.ndarray:
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


@dataclass
class PhraseRows:
    phrase: str
    rows: list[int]
    """positions (in the assembled sequence, decode steps after it) whose attention makes the map"""


def layer_index_fn(stage):
    """For a LayerStage: layer -> (B, L') indices of the tokens a shortened layer holds (None: all)."""
    def kept_index(layer: int):
        held = [st for st in stage.stages if st.layer <= layer]
        return held[-1].keep if held else None

    return kept_index


def _assembled_index(inputs, positions: torch.Tensor, valid: torch.Tensor, b: int) -> dict[int, int]:
    """Original (processor) token index -> position in the assembled sequence, for sample ``b``. Row 0 of the
    positions is the token's index among the sample's real tokens, so pruning and re-padding are undone."""
    n_pad = int((inputs["attention_mask"][b] == 0).sum())
    pos = positions[0, b]
    return {n_pad + int(pos[j]): j for j in valid[b].nonzero().flatten().tolist()}


def phrase_rows(tokenizer, cfg: GroundingConfig, inputs, positions, valid, b: int, phrases: list[str],
                answer_ids: list[int], decode_steps: int) -> list[PhraseRows]:
    length = valid.shape[1]
    out: list[PhraseRows] = []

    def chose(toks) -> list[int]:
        """The rows that chose answer tokens ``toks``: the last prompt token for token 0, else decode step i - 1
        (the last token's step never ran)."""
        return [length - 1 if i == 0 else length + i - 1 for i in toks if i - 1 < decode_steps]

    if phrases:
        reply = chose(range(len(answer_ids))) or [length - 1]
        to_assembled = _assembled_index(inputs, positions, valid, b)
        ids = inputs["input_ids"][b].tolist()
        for p in phrases:
            orig = find_phrase(tokenizer, ids, p)
            own = [to_assembled[i] for i in orig if i in to_assembled]
            rows = {"phrase": own, "answer": [length - 1], "phrase+answer": own + [length - 1], "reply": reply,
                    "phrase+reply": own + reply}[cfg.prompt_rows]
            out.append(PhraseRows(p, sorted(set(rows))))
    if cfg.answer_objects and answer_ids:
        text, spans = token_spans(tokenizer, answer_ids)
        merged: dict[str, list[int]] = {}
        for phrase, s, e in object_phrases(text, cfg.object_words):
            rows = chose(tokens_in(spans, s, e))
            if rows:
                merged.setdefault(phrase.lower(), []).extend(rows)
        out += [PhraseRows(p, sorted(set(r))) for p, r in merged.items()]
    return out


@dataclass
class SampleContext:
    """What mapping sample ``b``'s attention onto its images needs (this sample's images only: ImageTokens with
    their grid, kept token indices, the original PIL images, and the box of each image its grid covers)."""

    b: int
    image_mask: torch.Tensor
    valid: torch.Tensor
    images: list
    kept: list[torch.Tensor]
    pil_images: list
    regions: list[tuple[float, float, float, float]]
    """per image (not per view): the box its grids cover"""
    source: list[int] | None = None
    """per visual input of ``images``, the index of its image in ``pil_images`` (views of one image share it;
    None: one visual input per image)"""


def _layer_ids(cfg: GroundingConfig, n_layers: int) -> list[int]:
    """``cfg.layers`` as non-negative indices (all layers for None)."""
    if cfg.layers is None:
        return list(range(n_layers))
    if any(not -n_layers <= k < n_layers for k in cfg.layers):
        raise PolicyError(f"grounding.layers = {cfg.layers}: the model has {n_layers} decoder layers")
    return [k % n_layers for k in cfg.layers]


def phrase_maps(capture: AttentionCapture, cfg: GroundingConfig, requests: list[PhraseRows],
                ctx: SampleContext) -> list[tuple[int, torch.Tensor]]:
    """Per request: (image index, H x W map in [0, 1]) -- head-aggregated attention of its rows, propagated
    across ``cfg.layers`` (``cfg.flow``), sinks zeroed, on the image holding most of it, upsampled to pixels.
    The direct maps (``flow: none``) read only the requests' rows (:meth:`AttentionCapture.row_attention`); the
    flows push through every layer's whole matrix."""
    b, valid = ctx.b, ctx.valid
    length = valid.shape[1]
    layers = _layer_ids(cfg, capture.n_layers)
    if cfg.flow == "none":  # only the asked-for rows: relevance = the mean over layers of start @ rows
        union = sorted({r for req in requests for r in req.rows})
        mats = list(capture.row_attention(b, union, layers).cpu())
        index = {r: i for i, r in enumerate(union)}  # a request's row -> its row in ``mats``
    else:
        n = max(max(r.rows) for r in requests) + 1
        mats = [capture.matrix(b, k, max(n, length)).cpu() for k in layers]
        index = None  # ``mats`` are whole matrices: rows are positions
    starts = []
    for req in requests:
        start = torch.zeros(mats[0].shape[0])
        start[[index[r] for r in req.rows] if index else req.rows] = 1.0 / len(req.rows)
        starts.append(start)
    extra = mats[0].shape[-1] - length
    valid_full = torch.cat([valid[b].cpu(), torch.ones(extra, dtype=torch.bool)])
    image_full = torch.cat([(ctx.image_mask[b] & valid[b]).cpu(), torch.zeros(extra, dtype=torch.bool)])
    cols = image_full.nonzero().flatten()
    cells = torch.cat([k.cpu() for k in ctx.kept])
    owner = torch.cat([torch.full((k.numel(),), i) for i, k in enumerate(ctx.kept)])
    if cols.numel() != cells.numel():
        raise RuntimeError(f"grounding found {cols.numel()} image tokens in the sequence but {cells.numel()} kept "
                           "tokens for the sample's images")
    sinks = torch.zeros(cols.numel(), dtype=torch.bool)
    if cfg.remove_sinks:
        phi = {k: v[b].cpu() for k, v in capture.phi.items()}
        sinks = maps.sink_tokens(phi, image_full[:length], cfg.sink_tau, cfg.sink_from_layer)[cols]
    source = torch.tensor(ctx.source if ctx.source is not None else range(len(ctx.kept)), dtype=torch.long)
    out = []
    for start in starts:
        rel = maps.propagate(mats, start, cfg.flow, valid_full)
        vals = rel[cols].masked_fill(sinks, 0.0)
        mass = torch.zeros(len(ctx.kept)).index_add_(0, owner, vals)
        i = int(torch.zeros(len(ctx.pil_images)).index_add_(0, source, mass).argmax())  # the image holding most
        views = [v for v in range(len(ctx.kept)) if int(source[v]) == i]
        if len(views) == 1:
            own = owner == views[0]
            grid = maps.grid_map(vals[own], cells[own], ctx.images[views[0]].grid)
            heat = maps.grid_to_pixels(maps.normalise(grid), ctx.regions[i], ctx.pil_images[i].size)
        else:  # several views of one image: each view's attention as a density over its part of the image, summed
            heat = torch.stack([_view_density(ctx, v, i, vals[owner == v], cells[owner == v]) for v in views]).sum(0)
        out.append((i, maps.normalise(heat)))
    return out


def _view_density(ctx: SampleContext, v: int, i: int, vals: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """View ``v`` of image ``i``: its tokens' attention spread over the pixels its grid covers (per token's area,
    so views of different resolutions add up as densities)."""
    view = ctx.images[v]
    _, h, w = view.grid
    box = view.pixel_box(ctx.regions[i])
    area = max(1e-6, (box[2] - box[0]) * (box[3] - box[1]))
    return maps.grid_to_pixels(maps.grid_map(vals, cells, view.grid) * (h * w / area), box, ctx.pil_images[i].size)


def ground_sample(capture: AttentionCapture, cfg: GroundingConfig, requests: list[PhraseRows], ctx: SampleContext,
                  predictor, embeddings: ImageEmbeddings, arrays: dict | None = None) -> list[Grounding]:
    """Ground ``requests`` for one sample: maps, then points and a SAM mask per map (SAM holds each image once
    and prompts all of its phrases together). ``arrays``: id(PIL image) -> (image, RGB array, content key), as
    :meth:`Grounder.prefetch` prepared them."""
    if not requests or not ctx.images:
        return []
    out: list[Grounding | None] = [None] * len(requests)
    by_image: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for k, (req, (i, heat)) in enumerate(zip(requests, phrase_maps(capture, cfg, requests, ctx))):
        w, h = ctx.pil_images[i].size
        if float(heat.max()) <= 0:  # no attention left on this image (e.g. everything pruned or a sink)
            out[k] = Grounding(req.phrase, i, heat.numpy(), np.zeros((0, 2), np.float32), np.zeros(0, np.int64),
                               None, np.zeros((h, w), bool), 0.0)
        else:
            by_image.setdefault(i, []).append((k, heat))
    for i, items in by_image.items():
        image = ctx.pil_images[i]
        entry = (arrays or {}).get(id(image))
        embeddings.set(*(entry[1:] if entry is not None and entry[0] is image else (_rgb(image), None)))
        for (k, heat), seg in zip(items, segment_all(predictor, [heat for _, heat in items], cfg)):
            out[k] = Grounding(requests[k].phrase, i, heat.numpy().astype(np.float32), seg.points, seg.labels,
                               seg.box, seg.mask, seg.score)
    done = [g for g in out if g is not None]
    assert len(done) == len(out), "a phrase got no map"
    return done


def per_sample_phrases(ground_phrases, n: int, single: bool) -> list[list[str]]:
    """``ground_phrases`` as one list per prompt: a string or a list of strings (the same for every prompt of a
    batch), or for a batch a list of per-prompt lists."""
    if ground_phrases is None:
        return [[] for _ in range(n)]
    if isinstance(ground_phrases, str):
        return [[ground_phrases] for _ in range(n)]
    items = list(ground_phrases)
    if all(isinstance(p, str) for p in items):
        return [list(items) for _ in range(n)]
    if not single and len(items) == n and all(isinstance(x, (list, tuple)) and all(isinstance(p, str) for p in x)
                                             for x in items):
        return [list(x) for x in items]
    raise InputError(f"ground_phrases must be a string, a list of strings, or (for a batch of {n} prompts) a list "
                     f"of {n} lists of strings; got {ground_phrases!r}")


class Grounder:
    """An accelerator's grounding stage: its config and its SAM predictor (loaded on first use; assign
    ``acc.grounder.predictor`` to use another object with segment-anything's predictor API)."""

    def __init__(self, cfg: GroundingConfig | None, device="cpu"):
        self.cfg = cfg or GroundingConfig()
        self.device = device
        self._predictor = None
        self._embeddings: ImageEmbeddings | None = None
        self.last_request: GroundingRun | None = None
        self._arrays: dict[int, tuple] = {}
        """id(PIL image) -> (the image, its RGB array, its content key) for the request in flight"""

    @property
    def predictor(self):
        if self._predictor is None:
            self.predictor = load_predictor(self.cfg, self.device)
        return self._predictor

    @predictor.setter
    def predictor(self, value) -> None:
        self._predictor = value
        self._embeddings = ImageEmbeddings(value)

    @property
    def embeddings(self) -> ImageEmbeddings:
        """``set_image`` with a one-image memory (``forget()`` to force re-encoding)."""
        self.predictor  # noqa: B018  (loads it)
        assert self._embeddings is not None  # set with the predictor
        return self._embeddings

    def prefetch(self, batch_images: list[list]) -> None:
        """Before the VLM runs: convert the request's images for SAM once (RGB array and content key, reused by
        :meth:`GroundingRun.finish`) and start SAM's image encoder on them in the background (``cfg.overlap``)."""
        images = [im for imgs in batch_images for im in imgs]
        arrays = [_rgb(im) for im in images]
        keys = [ImageEmbeddings.key(a) for a in arrays]
        self._arrays = {id(im): (im, a, k) for im, a, k in zip(images, arrays, keys)}
        if self.cfg.overlap:
            self.embeddings.prefetch(arrays, keys)

    def begin(self, request, phrases: list[list[str]]) -> "GroundingRun":
        """This call's grounding run: an observer of every layer's attention (registered on the call's attention
        session, before reweighting) and the massive-activation pre-hooks, finished after decoding."""
        stage = request.stage
        kept_index = layer_index_fn(stage) if stage is not None and stage.stages else None
        cfg, n_layers, valid = self.cfg, request.n_layers, request.valid
        all_rows = cfg.flow != "none" or cfg.head_weights == "mean-max"
        # sinks are read at the inputs of layers >= sink_from_layer (all layers when the model is shallower)
        phi_layers = range(cfg.sink_from_layer if n_layers > cfg.sink_from_layer else 0, n_layers)
        capture = AttentionCapture(n_layers, valid, cfg.head_weights, kept_index, image=request.image_mask & valid,
                                   all_rows=all_rows, layers=_layer_ids(cfg, n_layers) if cfg.flow == "none" else None,
                                   phi_layers=phi_layers)
        return GroundingRun(self, capture, phrases)


@dataclass
class GroundingRun(Run):
    grounder: Grounder
    capture: AttentionCapture
    phrases: list[list[str]]

    def register(self, session) -> None:
        self.capture.register(session)

    def hooks(self, layers):
        return self.capture.hooks(layers, self.grounder.cfg.remove_sinks)

    def finish(self, request, tokens: list[list[int]]) -> list[list[Grounding]]:
        """Per sample, its groundings (after decoding; ``tokens`` are the generated ids per sample)."""
        g, cfg = self.grounder, self.grounder.cfg
        g.last_request = self  # kept until the next call: its capture, for inspection (demo, ablations)
        processor, adapter = request.processor, request.adapter
        out: list[list[Grounding]] = []
        self.samples: list[tuple[list[PhraseRows], SampleContext]] = []
        with torch.inference_mode():
            for b, imgs in enumerate(request.batch_images):
                own = request.own(b)
                reqs = phrase_rows(processor.tokenizer, cfg, request.inputs, request.positions, request.valid, b,
                                   self.phrases[b], tokens[b], self.capture.decode_steps)
                ctx = SampleContext(b, request.image_mask, request.valid, [request.visual[i] for i in own],
                                    [request.kept[i] for i in own], imgs,
                                    [adapter.grid_region(processor, im.size) for im in imgs],
                                    [request.encoded.source[i] for i in own])
                self.samples.append((reqs, ctx))
                if not reqs or not imgs:
                    out.append([])
                    continue
                out.append(ground_sample(self.capture, cfg, reqs, ctx, g.predictor, g.embeddings, g._arrays))
        g._arrays = {}
        return out
