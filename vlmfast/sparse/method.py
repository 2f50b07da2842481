"""``mminference``: modality-aware permutation sparse prefill, selected by a policy.

    methods:
      - method: mminference
        heads: tiny-llava-shapes     # per-model head-pattern file (shipped name or JSON path); optional
        default: {pattern: vertical_slash, vertical: 1000, slash: 1024}   # heads the file does not list
        min_length: 8192             # dense below this many tokens (sparse pays only on long inputs)

During prefill, in every decoder layer from ``first_layer`` on, vlmfast's attention function hands each
batch row's valid tokens (the tokens pruning kept, padding removed) to the sparse kernel with one
:class:`~vlmfast.sparse.mask.MaskSpec` per head, built from that head's pattern (grid, A-shape,
vertical-slash, block-sparse, modality boundaries) and the row's visual layout. Decoding, rows shorter than
``min_length`` and calls on token subsets (an attention method gathering its important tokens) use the
model's own kernel; each such fallback is counted in the report. The method registers as the layer's
*kernel* on the attention session, so overrides and wrappers (ZipVL, VAR) call it as their base.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Callable, ClassVar, Literal

import torch
from pydantic import Field

from ..adapters.base import ModelInfo
from ..errors import PolicyError
from ..method import Method, Run, method_dataclass
from ..registry import register
from .kernels import sparse_attention
from .layout import Layout
from .mask import MaskSpec
from .patterns import HeadContext, Pattern, VerticalSlash, parse_pattern, pattern_dict

CONFIG_DIR = Path(__file__).parent / "configs"
FORMAT = "vlmfast-sparse/1"


class HeadPatterns:
    """A per-model head-pattern file: for each layer, each head's pattern (and the recall / density the
    search measured). JSON::

        {"format": "vlmfast-sparse/1", "model": "...", "block": 64, "target_recall": 0.95,
         "layers": [{"0": {"pattern": "grid", "stride": "frame", "phase": 3, ..., "recall": 0.97,
                           "density": 0.21}, "1": {...}}, ...]}
    """

    def __init__(self, layers: list[dict[int, Any]], model: str = "", block: int | None = None,
                 meta: dict | None = None, source: str = "<object>"):
        self.layers = layers
        self.model = model
        self.block = block
        self.meta = meta or {}
        self.source = source

    def pattern(self, layer: int, head: int):
        if layer >= len(self.layers):
            return None
        return self.layers[layer].get(head)

    @classmethod
    def load(cls, spec: str | Path) -> "HeadPatterns":
        path = CONFIG_DIR / f"{spec}.json" if (CONFIG_DIR / f"{spec}.json").is_file() else Path(spec)
        if not path.is_file():
            shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise PolicyError(f"head-pattern file {str(spec)!r} is neither a shipped one "
                              f"({', '.join(shipped) or 'none'}) nor a JSON file")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PolicyError(f"{path}: not valid JSON: {e}") from None
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "HeadPatterns":
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("layers"), list):
            raise PolicyError(f"{source}: expected a head-pattern object with format {FORMAT!r} and a 'layers' list")
        layers = []
        for i, layer in enumerate(data["layers"]):
            heads = {}
            for h, entry in layer.items():
                entry = {k: v for k, v in entry.items() if k not in ("recall", "density")}
                try:
                    heads[int(h)] = parse_pattern(entry)
                except Exception as e:  # pydantic ValidationError or a bad head key
                    raise PolicyError(f"{source}: layers[{i}][{h!r}]: {e}") from None
            layers.append(heads)
        meta = {k: v for k, v in data.items() if k not in ("format", "layers", "model", "block")}
        return cls(layers, data.get("model", ""), data.get("block"), meta, source)

    def to_dict(self, scores: list[dict[int, dict]] | None = None) -> dict:
        layers = []
        for i, heads in enumerate(self.layers):
            row = {}
            for h, p in sorted(heads.items()):
                row[str(h)] = {**pattern_dict(p), **((scores or [{}] * (i + 1))[i].get(h, {}) if scores else {})}
            layers.append(row)
        return {"format": FORMAT, "model": self.model, "block": self.block, **self.meta, "layers": layers}

    def save(self, path: str | Path, scores=None) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(scores), indent=1) + "\n")


@register("mminference")
@method_dataclass
class MMInference(Method):
    """MMInference-style sparse prefill (grid / A-shape / vertical-slash / block / boundary heads)."""

    stage: ClassVar[str] = "prefill"
    heads: str | None = None
    """per-model head-pattern file (a shipped name from vlmfast/sparse/configs/ or a JSON path)"""
    default: Pattern = Field(default_factory=VerticalSlash)
    """pattern of heads the file does not list (every head when ``heads`` is None)"""
    min_length: Annotated[int, Field(ge=0)] = 8192
    """sequences shorter than this run dense (the model's own kernel)"""
    block: Annotated[int, Field(ge=16)] | None = None
    """kernel block size in tokens; None: the head file's, else 64"""
    backend: Literal["auto", "torch", "triton", "flex"] = "auto"
    first_layer: Annotated[int, Field(ge=0)] = 0

    def __post_init__(self):
        if self.heads:
            _load_heads(self.heads)  # a missing or malformed file fails when the policy is loaded

    @property
    def _patterns(self) -> HeadPatterns | None:
        return _load_heads(self.heads) if self.heads else None

    def head_patterns(self) -> HeadPatterns | None:
        return self._patterns

    @property
    def block_size(self) -> int:
        if self.block is not None:
            return self.block
        if self._patterns is not None and self._patterns.block:
            return int(self._patterns.block)
        return 64

    def check(self, info: ModelInfo) -> None:
        if self.first_layer >= info.num_layers:
            raise PolicyError(f"mminference.first_layer = {self.first_layer} is beyond the language model's depth "
                              f"({info.num_layers} layers)")
        if self._patterns is not None and len(self._patterns.layers) > info.num_layers:
            raise PolicyError(f"mminference.heads = {self.heads!r} lists {len(self._patterns.layers)} layers but the "
                              f"language model has {info.num_layers}: is it the head file of another model?")

    def pattern_for(self, layer: int, head: int):
        p = self._patterns.pattern(layer, head) if self._patterns is not None else None
        return p if p is not None else self.default

    def start(self, request) -> "SparseRun":
        """Per-request state from what the request knows after the vision stage: the visual spans of each row
        (each visual input's grid and kept indices), valid tokens and the layer stage (for layer pruners)."""
        layouts = layouts_for(request.image_mask, request.visual, request.kept, request.counts)
        return SparseRun(self, layouts, request.valid, request.n_layers, request.stage)


def _load_heads(spec: str) -> HeadPatterns:
    path = CONFIG_DIR / f"{spec}.json" if (CONFIG_DIR / f"{spec}.json").is_file() else Path(spec)
    return _load_cached(str(path), path.stat().st_mtime if path.is_file() else 0.0, spec)


@lru_cache(maxsize=32)
def _load_cached(path: str, mtime: float, spec: str) -> HeadPatterns:
    return HeadPatterns.load(spec)


def layouts_for(image_mask: torch.Tensor, images: list, kept: list[torch.Tensor], images_per_row: list[int]
                ) -> list[Layout]:
    """One Layout per batch row over the padded prefill sequence: visual input i of the row (an image, or a video
    whose grid (t, h, w) has one step per frame group, so its frame stride is h*w) owns the next ``len(kept[i])``
    visual positions; its tokens keep their original raster offsets."""
    out, first = [], 0
    for b, count in enumerate(images_per_row):
        own = range(first, first + count)
        out.append(Layout.from_counts(image_mask.shape[1], image_mask[b].cpu(), [images[i].grid for i in own],
                                      [kept[i].cpu() for i in own],
                                      [getattr(images[i], "kind", "image") for i in own]))
        first += count
    return out


@contextmanager
def recording_density():
    """Within the block, sparse runs record their heads' mask densities (their report's ``density``)."""
    SparseRun.record_density = True
    try:
        yield
    finally:
        SparseRun.record_density = False


class SparseRun(Run):
    """One request: registers the sparse kernel on every layer, keeps per-layer counts for the report."""

    record_density = False
    """True inside ``recording_density()`` (benchmarks): new runs record each sparse head's mask density and
    report their mean as ``density`` (costly: O(n^2) per head)"""

    def __init__(self, method: MMInference, layouts: list[Layout], valid: torch.Tensor, n_layers: int, stage=None):
        self.m, self.layouts, self.valid, self.n_layers, self.stage = method, layouts, valid, n_layers, stage
        self.prefill_len = valid.shape[1]
        self.sparse_calls = 0
        self.fallbacks: dict[str, int] = {}
        self.patterns: dict[str, int] = {}
        self.densities: list[float] | None = [] if self.record_density else None
        """each sparse head's mask density (a list when recording, else None)"""

    def register(self, session) -> None:
        for layer in range(self.m.first_layer, self.n_layers):
            session.kernel(layer, self._attention)

    def _fallback(self, why: str, base, module, query, key, value, mask, kwargs):
        self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
        return base(module, query, key, value, mask, **kwargs)

    def _columns(self, layer: int, length: int):
        """(B, length) indices into the prefill sequence and validity of the current sequence's tokens."""
        if length == self.prefill_len:
            b = self.valid.shape[0]
            return torch.arange(length, device=self.valid.device).expand(b, -1), self.valid
        stages = [st for st in getattr(self.stage, "stages", []) if st.layer <= layer and st.keep is not None]
        if stages and stages[-1].keep.shape[1] == length:
            return stages[-1].keep, stages[-1].valid
        return None, None

    def _attention(self, module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   mask: torch.Tensor | None, base: Callable, **kwargs: Any):
        length = query.shape[2]
        if length == 1 or length != key.shape[2]:
            return base(module, query, key, value, mask, **kwargs)  # decoding
        cols, valid = self._columns(module.layer_idx, length)
        if cols is None:
            return self._fallback("token subset (another method gathered tokens)", base, module, query, key, value,
                                  mask, kwargs)
        counts = valid.sum(1)
        if int(counts.max()) < self.m.min_length:
            return self._fallback(f"shorter than min_length={self.m.min_length}", base, module, query, key, value,
                                  mask, kwargs)
        scale = kwargs.get("scaling") or getattr(module, "scaling", query.shape[-1] ** -0.5)
        bsz, h, _, d = query.shape
        out = query.new_zeros(bsz, length, h, d)
        groups = h // key.shape[1]
        for b in range(bsz):
            idx = valid[b].nonzero().squeeze(1)
            q, k, v = query[b, :, idx], key[b, :, idx], value[b, :, idx]
            if idx.numel() < self.m.min_length:  # this row alone is short: dense (causal) on its own tokens
                why = "row shorter than min_length"
                self.fallbacks[why] = self.fallbacks.get(why, 0) + 1
                full = MaskSpec.full(idx.numel(), self.m.block_size, q.device)
                out[b, idx] = sparse_attention(q, k, v, [full] * h, scale, self.m.backend)
                continue
            layout = self.layouts[b].subset(cols[b, idx].cpu())
            cache: dict = {}
            specs = []
            for head in range(h):
                pat = self.m.pattern_for(module.layer_idx, head)
                ctx = HeadContext(q[head], k[head // groups], layout, self.m.block_size, scale, cache)
                specs.append(pat.build(ctx))
                self.patterns[pat.pattern] = self.patterns.get(pat.pattern, 0) + 1
            out[b, idx] = sparse_attention(q, k, v, specs, scale, self.m.backend)
            if self.densities is not None:
                self.densities += [s.density() for s in specs]
        self.sparse_calls += 1
        return out, None

    def report(self, b: int) -> dict:
        spans = [{"kind": s.kind, "grid": list(s.grid), "frame_stride": s.frame_stride, "tokens": s.end - s.start}
                 for s in self.layouts[b].spans]
        summary = f"{self.sparse_calls} sparse layers" + (f", dense: {self.fallbacks}" if self.fallbacks else "")
        rep: dict[str, Any] = {
            "stage": "prefill", "method": "mminference", "layer": None, "sparse_layers": self.sparse_calls,
            "dense_fallbacks": dict(self.fallbacks), "head_patterns": dict(self.patterns), "visual_spans": spans,
            "summary": summary}
        if self.densities:  # the whole batch's sparse heads
            rep["density"] = sum(self.densities) / len(self.densities)
        return rep
