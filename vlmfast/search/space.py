"""The search space: a method, then its hyper-parameters, chosen so the policy spends the visual-token budget.

The budget ``B`` is the share of visual tokens the language model sees, **averaged over its decoder layers**
(``Stats.layer_avg_visual_tokens / Stats.visual_tokens_in``; for ZipVL, the share of tokens in its important
set; docs/search.md). Spending less than B never raises the objective, so wherever a method's token count is
a formula of its fields the field that sets the count is *solved* from B instead of searched:

* vision pruners (FoPru, FasterVLM, VisionZip, DivPrune, CDPruner, downsample, random): ``keep = B``; their other
  fields come from the dataclass's pydantic schema (``Literal`` -> categorical, a float bounded on both sides -> a
  range), with explicit ranges where the schema has none (VisionZip's ``contextual``) and the vision ``layer`` chosen
  among the upper half of the tower; ``view_budget`` (how a multi-view image's budget splits over its views) only
  on models whose images are several views (LLaVA-NeXT, LLaVA-OneVision, InternVL), fixed at its default on the
  others;
* FastV: layer ``K`` in ``1 .. ceil(B * L) - 1`` (layers before K see every token), ``keep`` solved from
  ``(K + (L - K) * keep) / L = B``;
* PyramidDrop: 1-3 stages evenly spaced from a first to a last layer, ``ratio`` solved by bisection;
* VFlowOpt: VFlowOpt's own space (arXiv 2508.05211 code: ``t`` in [0, 50], ``alpha`` in [-1, 1], recycling
  cell ``m`` scaled to the token grid; ``view_budget`` on multi-view models), 0-2 LLM stages, ``r_v`` (``keep``)
  in [B, min(1, 2B)] when there are stages, ``r_1`` searched and the last stage's ratio solved from the budget,
  as VFlowOpt solves ``r_2``;
* ZipVL: ``tau`` (searched as ``1 - tau`` on a log scale), ``probe``, ``first_layer``; its share of important
  tokens is data-dependent, so the budget is a constraint checked on the measured share. ``kv``, bit widths
  and group size only change the cache after prefill, not the objective, and stay at their defaults.

Parameters are named ``<method>.<field>``; the CSV of trials also has each trial's resulting policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, get_args

from pydantic import TypeAdapter

from ..budget import ViewBudget
from ..errors import InputError
from ..pruners import (
    CDPruner,
    DivPrune,
    Downsample,
    FasterVLM,
    FastV,
    FoPru,
    Method,
    PyramidDrop,
    RandomPruner,
    VFlowOpt,
    VisionPruner,
    VisionZip,
    ZipVL,
)
from ..registry import available, get_method


@dataclass(frozen=True)
class SpaceContext:
    """What the space needs to know about the model and the budget."""

    budget: float
    n_layers: int
    """decoder layers of the language model"""
    n_vision_layers: int
    feature_layer: int
    """absolute index of the vision layer whose output feeds the language model"""
    tokens_per_image: int
    multi_view: bool = False
    """does the model make an image several views (the pruners' ``view_budget`` is searched only then)"""

    @property
    def grid_side(self) -> float:
        return math.sqrt(max(1, self.tokens_per_image))

    @property
    def max_full_layers(self) -> int:
        """Most leading decoder layers that may see every visual token while the average stays below B."""
        return math.ceil(self.budget * self.n_layers - 1e-9) - 1

    def vision_layer_choices(self) -> tuple:
        """None (the feature layer) and the other layers of the tower's upper half, as negative indices."""
        n = self.n_vision_layers
        return (None, *[i - n for i in range(n - 1, n // 2 - 1, -1) if i != self.feature_layer])


@dataclass(frozen=True)
class Dim:
    """One searched parameter."""

    name: str
    kind: str  # "float" | "int" | "cat"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    choices: tuple = ()
    note: str = ""

    def suggest(self, trial, method: str) -> Any:
        key = f"{method}.{self.name}"
        if self.kind == "cat":
            return trial.suggest_categorical(key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(key, int(self.low), int(self.high))
        return trial.suggest_float(key, self.low, self.high, log=self.log)

    def __str__(self) -> str:
        if self.kind == "cat":
            what = "one of " + ", ".join("None" if c is None else str(c) for c in self.choices)
        else:
            what = f"{self.kind} in [{self.low:g}, {self.high:g}]" + (" (log)" if self.log else "")
        return f"{self.name}: {what}" + (f"  -- {self.note}" if self.note else "")


def _floor(x: float, digits: int = 4) -> float:
    """Round down (the budget is an upper bound), but stay > 0."""
    return max(10 ** -digits, math.floor(x * 10 ** digits + 1e-9) / 10 ** digits)


class MethodSpace:
    name: str = ""

    def infeasible(self, ctx: SpaceContext) -> str | None:
        """Why this method cannot meet the budget on this model, or None."""
        return None

    def dims(self, ctx: SpaceContext) -> list[Dim]:
        raise NotImplementedError

    def solved(self, ctx: SpaceContext) -> list[str]:
        """Fields computed from the budget (for describe)."""
        return []

    def fixed(self, ctx: SpaceContext) -> list[str]:
        return []

    def suggest(self, trial, ctx: SpaceContext) -> Method:
        raise NotImplementedError

    def describe(self, ctx: SpaceContext) -> list[str]:
        lines = [str(d) for d in self.dims(ctx)]
        lines += [f"{s}  (solved from the budget)" for s in self.solved(ctx)]
        lines += [f"{f}: fixed at its default" for f in self.fixed(ctx)]
        return lines


class SchemaSpace(MethodSpace):
    """Vision pruners: ``keep`` = B; other fields derived from the pydantic schema (see module docstring)."""

    def __init__(self, cls: type[Method], ranges: dict[str, tuple] | None = None, fixed: tuple[str, ...] = ()):
        self.cls, self.name = cls, cls.method_name
        self.ranges, self._fixed = ranges or {}, set(fixed)

    def _fields(self, ctx: SpaceContext) -> dict[str, dict]:
        """The fields besides ``keep`` (solved), without ``view_budget`` where it has no effect (one view per image)."""
        props = TypeAdapter(self.cls).json_schema().get("properties", {})
        return {n: p for n, p in props.items() if n != "keep" and (n != "view_budget" or ctx.multi_view)}

    def _dim(self, name: str, prop: dict, ctx: SpaceContext) -> Dim | None:
        if name in self._fixed:
            return None
        if name in self.ranges:
            low, high, *log = self.ranges[name]
            return Dim(name, "float", low, high, bool(log and log[0]))
        if name == "layer":
            return Dim(name, "cat", choices=ctx.vision_layer_choices(), note="None = the layer feeding the LLM")
        if "enum" in prop:
            return Dim(name, "cat", choices=tuple(prop["enum"]))
        low = prop.get("minimum", prop.get("exclusiveMinimum"))
        high = prop.get("maximum", prop.get("exclusiveMaximum"))
        if prop.get("type") == "number" and low is not None and high is not None:
            eps = 1e-3 * (high - low)
            return Dim(name, "float", low + eps * ("exclusiveMinimum" in prop),
                       high - eps * ("exclusiveMaximum" in prop))
        return None

    def dims(self, ctx):
        out = []
        for name, prop in self._fields(ctx).items():
            d = self._dim(name, prop, ctx)
            if d is not None:
                out.append(d)
        return out

    def solved(self, ctx):
        return [f"keep = {ctx.budget:g}"]

    def fixed(self, ctx):
        searched = {d.name for d in self.dims(ctx)}
        return [n for n in self._fields(ctx) if n not in searched]

    def suggest(self, trial, ctx):
        values = {d.name: d.suggest(trial, self.name) for d in self.dims(ctx)}
        values = {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}  # readable YAML
        return self.cls(keep=ctx.budget, **values)


class FastVSpace(MethodSpace):
    name = "fastv"

    def infeasible(self, ctx):
        if ctx.max_full_layers < 1:
            return (f"the layers before its first drop layer (>= 1) see every visual token, so on a {ctx.n_layers}-"
                    f"layer model its layer average is above 1/{ctx.n_layers} = {1 / ctx.n_layers:.3g}, not within "
                    f"the budget {ctx.budget:g}")
        return None

    def dims(self, ctx):
        return [Dim("layer", "int", 1, ctx.max_full_layers, note="K: tokens drop before decoder layer K")]

    def solved(self, ctx):
        return ["keep = (B * L - K) / (L - K)"]

    def suggest(self, trial, ctx):
        k = self.dims(ctx)[0].suggest(trial, self.name)
        bl = ctx.budget * ctx.n_layers
        return FastV(layer=k, keep=min(1.0, _floor((bl - k) / (ctx.n_layers - k))))


def _layer_average(first_share: float, layers: list[int], ratios: list[float], n_layers: int) -> float:
    """Layer-averaged share when layers < layers[0] see ``first_share`` and each stage multiplies by a ratio."""
    total, share, prev = 0.0, first_share, 0
    for layer, r in zip(layers, ratios):
        total += (layer - prev) * share
        share, prev = share * r, layer
    return (total + (n_layers - prev) * share) / n_layers


class PyramidDropSpace(MethodSpace):
    name = "pyramiddrop"

    def infeasible(self, ctx):
        return FastVSpace().infeasible(ctx)

    def _max_stages(self, ctx):
        return max(1, min(3, ctx.n_layers - 1))

    def dims(self, ctx):
        return [Dim("stages", "cat", choices=tuple(range(1, self._max_stages(ctx) + 1))),
                Dim("first", "int", 1, ctx.max_full_layers, note="first drop layer"),
                Dim("spread", "float", 0.0, 1.0, note="last drop layer = first + spread * (L - 1 - first); "
                                                       "stages evenly spaced between")]

    def solved(self, ctx):
        return ["ratio (bisection on the layer average = B)"]

    def suggest(self, trial, ctx):
        stages, first, spread = (d.suggest(trial, self.name) for d in self.dims(ctx))
        last = first + round(spread * (ctx.n_layers - 1 - first))
        layers = sorted({round(first + i * (last - first) / max(1, stages - 1)) for i in range(stages)})
        lo, hi = 0.0, 1.0
        if _layer_average(1.0, layers, [1.0] * len(layers), ctx.n_layers) > ctx.budget:
            for _ in range(60):
                mid = (lo + hi) / 2
                avg = _layer_average(1.0, layers, [mid] * len(layers), ctx.n_layers)
                lo, hi = (mid, hi) if avg <= ctx.budget else (lo, mid)
        return PyramidDrop(layers=layers, ratio=_floor(lo) if lo > 0 else 1e-4)


class VFlowOptSpace(MethodSpace):
    name = "vflowopt"

    def _max_stages(self, ctx):
        return max(0, min(2, ctx.n_layers - 1))

    def dims(self, ctx):
        g = ctx.grid_side
        out = [Dim("t", "float", 0.0, 50.0, note="VFlowOpt's range"),
               Dim("alpha", "float", -1.0, 1.0, note="VFlowOpt's range (released configs: 0)"),
               Dim("m", "float", 1.0, max(1.0, g), note="recycling cell in tokens (VFlowOpt: 3..24 on a 27-grid)"),
               Dim("layer", "cat", choices=ctx.vision_layer_choices(), note="None = the layer feeding the LLM")]
        if ctx.multi_view:
            out.append(Dim("view_budget", "cat", choices=get_args(ViewBudget), note="the budget's split over views"))
        if self._max_stages(ctx):
            out += [Dim("stages", "cat", choices=tuple(range(self._max_stages(ctx) + 1)), note="LLM stages"),
                    Dim("k1", "int", 1, ctx.n_layers - 1, note="LLM stage layers (sorted, duplicates merged)"),
                    Dim("k2", "int", 1, ctx.n_layers - 1),
                    Dim("rv", "float", 0.0, 1.0, note="keep = B + rv * (min(1, 2B, B*L/k1) - B) with stages"),
                    Dim("r1", "float", 0.0, 1.0, note="first of two stages' keep, between its feasible bounds")]
        return out

    def solved(self, ctx):
        return ["keep = B when there are no LLM stages", "llm_keep[-1] (as VFlowOpt solves r_2)"]

    def suggest(self, trial, ctx):
        dims = {d.name: d for d in self.dims(ctx)}
        v = {n: dims[n].suggest(trial, self.name) for n in ("t", "alpha", "m", "layer")}
        base = dict(t=round(v["t"], 4), alpha=round(v["alpha"], 4), m=round(v["m"], 4), layer=v["layer"])
        if "view_budget" in dims:
            base["view_budget"] = dims["view_budget"].suggest(trial, self.name)
        stages = dims["stages"].suggest(trial, self.name) if "stages" in dims else 0
        if stages == 0:
            return VFlowOpt(keep=ctx.budget, **base)
        ks = [dims["k1"].suggest(trial, self.name)]
        if stages == 2:
            ks.append(dims["k2"].suggest(trial, self.name))
        layers = sorted(set(ks))
        b, n = ctx.budget, ctx.n_layers
        k1 = layers[0]
        rv_hi = min(1.0, 2 * b, b * n / k1 * (1 - 1e-3))
        rv = b + dims["rv"].suggest(trial, self.name) * max(0.0, rv_hi - b)
        rv = min(1.0, max(b, math.floor(rv * 1e4) / 1e4))
        target = b * n / rv  # sum over layers of the share relative to the LLM input
        if len(layers) == 1:
            keeps = [(target - k1) / (n - k1)]
        else:
            k2 = layers[1]
            r1_lo = max(1e-4, (target - k1) / (n - k1))
            r1_hi = min(1.0, (target - k1) / (k2 - k1))
            r1 = r1_lo + dims["r1"].suggest(trial, self.name) * max(0.0, r1_hi - r1_lo)
            r1 = min(1.0, max(r1_lo, r1))
            keeps = [r1, (target - k1 - r1 * (k2 - k1)) / (r1 * (n - k2))]
        keeps = [min(1.0, _floor(k)) for k in keeps]
        return VFlowOpt(keep=rv, llm_layers=layers, llm_keep=keeps, **base)


class ZipVLSpace(MethodSpace):
    name = "zipvl"

    def dims(self, ctx):
        out = [Dim("one_minus_tau", "float", 1e-3, 0.9, log=True, note="tau = 1 - this (paper: tau = 0.975)"),
               Dim("probe", "float", 0.01, 0.25, log=True)]
        if ctx.max_full_layers >= 1:
            out.append(Dim("first_layer", "int", 0, ctx.max_full_layers, note="earlier layers attend fully"))
        return out

    def fixed(self, ctx):
        return ["first_layer"] * (ctx.max_full_layers < 1) + \
               ["kv, bits_hi, bits_lo, group (the cache after prefill: no effect on the objective)"]

    def suggest(self, trial, ctx):
        v = {d.name: d.suggest(trial, self.name) for d in self.dims(ctx)}
        return ZipVL(tau=round(1 - v["one_minus_tau"], 5), probe=round(v["probe"], 4),
                     first_layer=v.get("first_layer", 0))


SPACES: dict[str, Callable[[], MethodSpace]] = {
    "fopru": lambda: SchemaSpace(FoPru),
    "fastervlm": lambda: SchemaSpace(FasterVLM),
    "visionzip": lambda: SchemaSpace(VisionZip, ranges={"contextual": (0.0, 0.5)}),
    "divprune": lambda: SchemaSpace(DivPrune),
    "cdpruner": lambda: SchemaSpace(CDPruner),
    "downsample": lambda: SchemaSpace(Downsample),
    "random": lambda: SchemaSpace(RandomPruner, fixed=("seed",)),
    "fastv": FastVSpace,
    "pyramiddrop": PyramidDropSpace,
    "vflowopt": VFlowOptSpace,
    "zipvl": ZipVLSpace,
}


def space_for(name: str) -> MethodSpace:
    """The search space of a registered method; third-party vision pruners with a ``keep`` field get the
    schema-derived space."""
    if name in SPACES:
        return SPACES[name]()
    try:
        cls = get_method(name)
    except Exception:
        raise InputError(f"--methods: unknown method {name!r}; expected some of: {', '.join(available())}") from None
    fields = TypeAdapter(cls).json_schema().get("properties", {})
    if issubclass(cls, VisionPruner) and "keep" in fields:
        return SchemaSpace(cls)
    raise InputError(f"--methods: {name!r} has no search space (only vision pruners with a 'keep' field get one "
                     f"automatically); expected some of: {', '.join(sorted(SPACES))}")


def baseline(name: str, budget: float) -> Method:
    """A seeding baseline of the search: the vision pruner ``name`` at its defaults with ``keep = budget`` (what
    ``vlmfast bench prune`` runs at that keep)."""
    try:
        cls = get_method(name)
    except Exception:
        raise InputError(f"--baselines: unknown method {name!r}; expected vision pruners, some of: "
                         f"{', '.join(available())}") from None
    if not (issubclass(cls, VisionPruner) and "keep" in TypeAdapter(cls).json_schema().get("properties", {})):
        raise InputError(f"--baselines: {name!r} is not a vision pruner with a 'keep' field (a baseline is a vision "
                         "pruner's defaults at keep = the budget), e.g. divprune,fopru,vflowopt,fastervlm,visionzip")
    return cls(keep=budget)  # type: ignore[call-arg]  # a dataclass with a keep field (checked above)


def parse_methods(spec: str, option: str = "--methods") -> list[str]:
    """The names of a comma-separated ``--methods`` (each with a search space) or ``--baselines`` (each a
    :func:`baseline`) list."""
    names = [m.strip() for m in (spec or "").split(",") if m.strip()]
    if not names:
        raise InputError(f"{option} {spec!r}: expected a comma-separated list, e.g. fopru,vflowopt,zipvl,fastv")
    if len(set(names)) != len(names):
        raise InputError(f"{option} {spec!r}: a method is listed twice")
    for n in names:
        if option == "--baselines":
            baseline(n, 1.0)
        else:
            space_for(n)
    return names
