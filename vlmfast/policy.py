"""Policies: which methods run on a model, with which hyper-parameters. A YAML file per model.

    name: llava-1.5-7b
    description: FoPru rank pruning, 25% of visual tokens
    models: ["llava-hf/llava-1.5-7b-hf"]          # hub ids / paths this policy is the default for
    methods:
      - method: fopru
        keep: 0.25
        strategy: rank

Everything is validated when the policy is loaded: unknown keys, unknown methods, values of the wrong type
or out of range. Checks that need the model (a layer beyond its depth) run when the policy is bound to a
model. Each error names the file, the field and what was expected.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .adapters.base import ModelInfo
from .errors import PolicyError
from .method import Method, format_validation_error
from .pruners.base import AttentionMethod, LayerPruner, VisionPruner
from .registry import get_method
from .reweight.base import BranchMethod, Reweighter

#: attention methods that restrict prefill attention and rewrite the KV cache (no VAR / branches with them)
_CACHE_REWRITERS = ("zipvl",)

POLICY_DIR = Path(__file__).parent / "policies"
NONE = "none"
"""the policy name for no methods (the plain model), in Python and on the command line"""


class _PolicyFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    description: str = ""
    models: list[str] = Field(default_factory=list)
    methods: list[dict[str, Any]] = Field(default_factory=list)
    grounding: dict[str, Any] | None = None


class Policy:
    """A validated list of method instances plus metadata. Compare, print, and save it like a value."""

    def __init__(self, methods: list[Method] | None = None, name: str | None = None, description: str = "",
                 models: list[str] | None = None, source: str = "<object>", grounding: Any = None):
        self.methods = list(methods or [])
        self.grounding = _grounding_config(grounding, source)
        """GroundingConfig for ``generate(..., ground=True)`` (None: its defaults)"""
        self.name = name
        self.description = description
        self.models = list(models or [])
        self.source = source
        for m in self.methods:
            if not isinstance(m, Method):
                raise PolicyError(f"{source}: {m!r} is not a vlmfast method (expected e.g. FoPru(keep=0.25))")
        layers = [k for m in self.layer_pruners for k in m.drop_layers()]
        if len(set(layers)) != len(layers):
            raise PolicyError(f"{source}: two layer pruners act at the same layer ({layers}); use one per layer")
        if self.attention_methods and layers:
            raise PolicyError(f"{source}: {self.attention_methods[0].method_name} cannot be combined with layer-stage "
                              "pruning yet (it needs the full sequence in every layer); use a vision-stage pruner")
        if len(self.attention_methods) > 1:
            raise PolicyError(f"{source}: at most one attention method per policy")
        if len(self.sparse_prefill) > 1:
            raise PolicyError(f"{source}: at most one sparse prefill method (mminference) per policy")
        self._check_reweighting(source, layers)

    # -- views -----------------------------------------------------------------------------------------------
    @property
    def vision_pruners(self) -> list[VisionPruner]:
        return [m for m in self.methods if isinstance(m, VisionPruner)]

    @property
    def layer_pruners(self) -> list[LayerPruner]:
        return [m for m in self.methods if isinstance(m, LayerPruner)]

    @property
    def attention_methods(self) -> list[AttentionMethod]:
        return [m for m in self.methods if isinstance(m, AttentionMethod)]

    @property
    def sparse_prefill(self) -> list[Method]:
        """Sparse prefill methods (``mminference``): they replace the dense attention kernel during prefill."""
        return [m for m in self.methods if m.stage == "prefill"]

    @property
    def reweighters(self) -> list[Reweighter]:
        return [m for m in self.methods if isinstance(m, Reweighter)]

    @property
    def branch_methods(self) -> list[BranchMethod]:
        return [m for m in self.methods if isinstance(m, BranchMethod)]

    def _check_reweighting(self, source: str, layers: list[int]) -> None:
        """VAR wraps attention and DAMRO / AGLA decode extra branches: say which combinations cannot work."""
        rw, br = self.reweighters, self.branch_methods
        if len(rw) > 1:
            raise PolicyError(f"{source}: at most one attention reweighting method (var) per policy")
        names = [m.method_name for m in br]
        if len(set(names)) != len(names):
            raise PolicyError(f"{source}: each decoding method may appear once, got {names}")
        for m in rw + br:
            if layers:
                raise PolicyError(f"{source}: {m.method_name} cannot be combined with layer-stage pruning "
                                  f"({', '.join(p.method_name for p in self.layer_pruners)}) yet: it needs every "
                                  "layer to see the tokens the language model received; use a vision-stage pruner")
            for a in self.attention_methods:
                if a.method_name in _CACHE_REWRITERS:
                    raise PolicyError(f"{source}: {m.method_name} cannot be combined with {a.method_name}: "
                                      f"{a.method_name} restricts prefill attention to its important tokens and "
                                      "rewrites the KV cache, so the attention rows and keys "
                                      f"{m.method_name} works on are not the model's")

    def vision_attention_layer(self, adapter) -> int | None:
        """The vision layer whose attention a request reads: the vision pruner's (when it needs attention), else
        DAMRO's, else None. Raises PolicyError when both need attention from different layers (one is read)."""
        vp = self.vision_pruners[0] if self.vision_pruners else None
        layer = adapter.resolve_vision_layer(vp.attention_layer()) if vp and vp.needs_attention else None
        for m in self.branch_methods:
            if not m.needs_vision_attention:
                continue
            own = adapter.resolve_vision_layer(m.attention_layer())
            if vp is not None and layer is not None and own != layer:
                raise PolicyError(f"{self.source}: {vp.method_name} reads vision layer {layer} and {m.method_name} "
                                  f"vision layer {own}; only one layer's attention is captured per request, so set "
                                  f"both to the same layer (None = the layer that feeds the language model)")
            layer = own
        return layer

    @property
    def reads_attention_means_only(self) -> bool:
        """Does every method that reads the vision attention need only its column and row means (so adapters may
        skip the (N, N) matrix)?"""
        readers = [p.reads_attention_means for p in self.vision_pruners if p.needs_attention]
        readers += [m.reads_attention_means for m in self.branch_methods if m.needs_vision_attention]
        return bool(readers) and all(readers)

    def is_for(self, model_name: str) -> bool | None:
        """Does ``models`` name this model? None when the policy names no models or the model has no name."""
        if not self.models or not model_name:
            return None
        name = model_name.lower()
        return any(fnmatch.fnmatch(name, pattern.lower()) for pattern in self.models)

    @property
    def is_empty(self) -> bool:
        return not self.methods

    def check(self, info: ModelInfo) -> None:
        """Validate against a concrete model; raises PolicyError naming the policy's source and field."""
        for i, m in enumerate(self.methods):
            try:
                m.check(info)
            except PolicyError as e:
                raise PolicyError(f"{self.source}: methods[{i}] ({m.method_name}): {e} "
                                  f"(model: {info.name or info.family})") from None

    # -- (de)serialisation -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> "Policy":
        if not isinstance(data, dict):
            raise PolicyError(f"{source}: a policy must be a mapping with a 'methods' list, got {type(data).__name__}")
        try:
            raw = _PolicyFile.model_validate(data)
        except ValidationError as e:
            raise PolicyError(f"{source}: {format_validation_error(e, '')}") from None
        methods = []
        for i, entry in enumerate(raw.methods):
            entry = dict(entry)
            name = entry.pop("method", None)
            if name is None:
                raise PolicyError(f"{source}: methods[{i}]: missing 'method' (the method's name, e.g. 'fopru')")
            try:
                method_cls = get_method(name)
            except PolicyError as e:
                raise PolicyError(f"{source}: methods[{i}].method: {e}") from None
            try:
                methods.append(method_cls(**entry))
            except PolicyError as e:
                field_errors = getattr(e, "validation", None)  # a bad field (method_dataclass)
                if field_errors is not None:
                    raise PolicyError(f"{source}: {format_validation_error(field_errors, f'methods[{i}] ({name})')}"
                                      ) from None
                raise PolicyError(f"{source}: methods[{i}] ({name}): {e}") from None
        return cls(methods, name=raw.name, description=raw.description, models=raw.models, source=source,
                   grounding=raw.grounding)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {}
        if self.name:
            out["name"] = self.name
        if self.description:
            out["description"] = self.description
        if self.models:
            out["models"] = self.models
        out["methods"] = [method_dict(m) for m in self.methods]
        if self.grounding is not None:
            out["grounding"] = dataclasses.asdict(self.grounding)
        return out

    def to_yaml(self, path: str | Path | None = None, header: str = "") -> str:
        text = header + yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Policy) and self.methods == other.methods and self.grounding == other.grounding

    def __repr__(self) -> str:
        return f"Policy(name={self.name!r}, methods={self.methods!r})"

    def describe(self) -> str:
        if self.is_empty:
            return "no methods (plain model)"
        return " + ".join(repr(m) for m in self.methods)


def _grounding_config(value: Any, source: str):
    """None, a GroundingConfig, or a dict of its fields."""
    from .grounding.config import GroundingConfig

    if value is None or isinstance(value, GroundingConfig):
        return value
    if not isinstance(value, dict):
        raise PolicyError(f"{source}: grounding must be a mapping of GroundingConfig fields, "
                          f"got {type(value).__name__}")
    try:
        return GroundingConfig(**value)
    except PolicyError as e:
        field_errors = getattr(e, "validation", None)
        if field_errors is None:
            raise PolicyError(f"{source}: grounding: {e}") from None
        raise PolicyError(f"{source}: {format_validation_error(field_errors, 'grounding')}") from None


def shipped_policies() -> dict[str, Path]:
    return {p.stem: p for p in sorted(POLICY_DIR.glob("*.yaml"))}


def load_policy(spec: "str | Path | dict | Policy | None") -> Policy:
    """A policy from a shipped name, a YAML path, a dict, a Policy, or None / ``"none"`` (no methods)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == NONE):
        return Policy(source="<none>")
    if isinstance(spec, Policy):
        return spec
    if isinstance(spec, dict):
        return Policy.from_dict(spec)
    if not isinstance(spec, (str, Path)):
        raise PolicyError(f"policy: expected a shipped policy name, a YAML path, a dict, a Policy, 'none' or None "
                          f"(VLMAccelerator also takes 'auto'), got {type(spec).__name__} {spec!r}")
    shipped = shipped_policies()
    path = shipped.get(str(spec)) or Path(spec)
    if not path.is_file():
        raise PolicyError(
            f"policy {str(spec)!r} is neither a shipped policy ({', '.join(shipped) or 'none'}) nor a YAML file"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PolicyError(f"{path}: not valid YAML: {e}") from None
    return Policy.from_dict(data, source=str(path))


def default_policy_for(model_name: str) -> tuple[Policy, str]:
    """The shipped policy whose ``models`` patterns match ``model_name``, else an empty policy; and why."""
    name = (model_name or "").lower()
    for stem, path in shipped_policies().items():
        pol = load_policy(path)
        for pattern in pol.models:
            if name and fnmatch.fnmatch(name, pattern.lower()):
                return pol, f"shipped policy '{stem}' (matches {pattern!r})"
    return Policy(source="<none>"), f"no shipped policy matches {model_name or 'this model'!r}: no methods"


def method_dict(m) -> dict:
    """A method as a policy file writes it: its name, then its fields; the keyword-only fields every method of a
    stage shares (a vision pruner's ``view_budget``) come last, and only when not at their default."""
    out: dict[str, Any] = {"method": m.method_name}
    shared = {}
    values = dataclasses.asdict(m)
    for f in dataclasses.fields(m):
        value = values[f.name]
        if f.kw_only:
            if value != f.default:
                shared[f.name] = value
        else:
            out[f.name] = value
    return {**out, **shared}
