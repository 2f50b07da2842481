"""What the demo does, without Gradio: load a model once, turn the page's knobs into a policy, answer a
request twice (the plain model and the policy, side by side) and describe the two results.

The page (``app.py``) only wires these functions to widgets, so everything here is tested as plain Python.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from PIL import Image, UnidentifiedImageError

from ..accelerator import GenerateOutput, VLMAccelerator
from ..errors import InputError, PolicyError
from ..inputs import to_rgb
from ..policy import Policy, default_policy_for, load_policy, shipped_policies
from ..pruners.base import LayerPruner, VisionPruner
from ..registry import available, get_method
from . import render

DEFAULT_MODEL = "tiny-llava-shapes"
NONE = "none"
UPLOADED = "uploaded YAML"
AS_POLICY = "as in policy"
OFF = "off"
#: larger uploads are refused with a message (the processor downsizes anyway; decoding them costs memory)
MAX_PIXELS = 40_000_000
#: method names the hallucination switch offers when they are registered (issue 6)
HALLUCINATION_NAMES = ("var", "damro", "agla")

EXAMPLES_DIR = Path(__file__).parent / "examples"
#: shipped ShapesWorld examples: (test-split seed, prompt); the PNGs are ``generate_scene(seed).image``
EXAMPLES: tuple[tuple[int, str], ...] = (
    (20000002, "what objects are in the image ?"),
    (20000009, "what colour is the hexagon ?"),
    (20000005, "how many green circles are there ?"),
    (20000008, "is there a blue hexagon in the image ?"),
)


def example_path(seed: int) -> Path:
    return EXAMPLES_DIR / f"shapes_{seed}.png"


def write_examples(folder: Path = EXAMPLES_DIR) -> list[Path]:
    """(Re)generate the shipped example PNGs from ShapesWorld (deterministic)."""
    from ..datasets.shapes import generate_scene

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed, _ in EXAMPLES:
        path = folder / example_path(seed).name
        generate_scene(seed).image.save(path)
        paths.append(path)
    return paths


# -- knobs <-> policy -------------------------------------------------------------------------------------------
def is_pruner(cls: type) -> bool:
    """Methods the pruner knob offers: vision- and layer-stage pruners and the rest of vlmfast.pruners."""
    return issubclass(cls, (VisionPruner, LayerPruner)) or cls.__module__.startswith("vlmfast.pruners")


def is_hallucination(cls: type) -> bool:
    """Methods the hallucination switch offers: vlmfast.reweight's (VAR, DAMRO, AGLA) and the known names."""
    return cls.__module__.startswith("vlmfast.reweight") or getattr(cls, "method_name", "") in HALLUCINATION_NAMES


def method_choices() -> tuple[list[str], list[str]]:
    """(pruner names, hallucination-method names) registered right now."""
    pruners, halluc = [], []
    for name in available():
        cls = get_method(name)
        if is_hallucination(cls):
            halluc.append(name)
        elif is_pruner(cls):
            pruners.append(name)
    return pruners, halluc


def _has_field(cls: type, name: str) -> bool:
    return any(f.name == name for f in dataclasses.fields(cls))


@dataclass
class Knobs:
    """The page's knobs as a policy sets them."""

    pruner: str
    keep: float
    hallucination: str


def knobs_of(policy: Policy, default_keep: float = 0.25) -> Knobs:
    """The knob values that reproduce ``policy``: its pruner (``AS_POLICY`` when it has several, or one
    without a ``keep``), its keep ratio, its hallucination method."""
    pruners = [m for m in policy.methods if is_pruner(type(m))]
    halluc = [m for m in policy.methods if is_hallucination(type(m))]
    if not pruners:
        pruner, keep = NONE, default_keep
    elif len(pruners) == 1 and _has_field(type(pruners[0]), "keep"):
        only = pruners[0]
        pruner, keep = only.method_name, float(only.keep)  # type: ignore[attr-defined]  # _has_field checked it
    else:
        pruner, keep = AS_POLICY, default_keep
    if len(halluc) > 1:
        return Knobs(pruner, keep, AS_POLICY)
    return Knobs(pruner, keep, halluc[0].method_name if halluc else OFF)


def _build(name: str, like: Any, **overrides) -> Any:
    """An instance of method ``name``: ``like``'s hyper-parameters when it is the same method, else the
    defaults; then ``overrides``."""
    cls = get_method(name)
    params = dataclasses.asdict(like) if like is not None and type(like) is cls else {}
    params.update(overrides)
    return Policy.from_dict({"methods": [{"method": name, **params}]}, source="the demo's knobs").methods[0]


def apply_knobs(policy: Policy, pruner: str, keep: float, hallucination: str) -> tuple[Policy, list[str]]:
    """``policy`` with its pruner(s) and hallucination method replaced by what the knobs say; other methods
    (sparse attention, ...) stay. Returns the new policy and notes on knobs that did not apply."""
    notes: list[str] = []
    old_pruners = [m for m in policy.methods if is_pruner(type(m))]
    old_halluc = [m for m in policy.methods if is_hallucination(type(m))]
    claimed = {id(m) for m in old_pruners + old_halluc}
    others = [m for m in policy.methods if id(m) not in claimed]
    if pruner == AS_POLICY:
        pruners = old_pruners
        if old_pruners:
            notes.append("keep ratio: not applied (pruner 'as in policy' keeps the policy's own budgets)")
    elif pruner == NONE:
        pruners = []
    else:
        like = next((m for m in old_pruners if m.method_name == pruner), None)
        if _has_field(get_method(pruner), "keep"):
            pruners = [_build(pruner, like, keep=float(keep))]
        else:
            pruners = [_build(pruner, like)]
            notes.append(f"keep ratio: {pruner} has no 'keep' (its budget is set by its own fields)")
    if hallucination == AS_POLICY:
        halluc = old_halluc
    elif hallucination == OFF:
        halluc = []
    else:
        like = next((m for m in old_halluc if m.method_name == hallucination), None)
        halluc = [_build(hallucination, like)]
    methods = [*pruners, *others, *halluc]
    if methods == policy.methods:
        return policy, notes
    out = Policy(methods, name=policy.name, description=policy.description, models=policy.models,
                 source=f"{policy.source} (edited by the demo's knobs)", grounding=policy.grounding)
    return out, notes


# -- results ----------------------------------------------------------------------------------------------------
@dataclass
class Side:
    """One column of the page: a policy's answer for the request."""

    title: str
    policy: Policy
    output: GenerateOutput
    grounding: list | None
    """the output's grounding (None when grounding was off or is not available)"""


class TokenView(NamedTuple):
    """One token grid the model makes of an image (an image of several views makes several: LLaVA-NeXT's base
    and high-resolution grids)."""

    label: str
    """"" for the only grid of an image; "base", "high-res" (or "view k") for the views of a multi-view image"""
    grid: tuple[int, int, int]
    box: tuple[float, float, float, float]
    """the part of the image this grid covers (x0, y0, x1, y1 pixels; may reach past the image)"""


@dataclass
class DemoResult:
    image: Image.Image
    views: list[TokenView]
    """the image's token grids, in the order of the model's visual inputs"""
    full: Side
    tuned: Side
    notes: list[str] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """Prefill (time to first token) of the full model over the policy's, measured in the same request."""
        a, b = self.full.output.stats.prefill_s, self.tuned.output.stats.prefill_s
        return a / b if a > 0 and b > 0 else None

    def token_overlay(self, side: Side) -> Image.Image:
        """The image with each token grid drawn over the part it covers (kept cells clear, dropped ones dark); an
        image of several views shows one such picture per view, side by side, each labelled with its kept / all tokens
        ("base 28/64")."""
        pics, labels = [], []
        for k, v in enumerate(self.views):
            kept = side.output.kept[k] if len(side.output.kept) > k else torch.arange(math.prod(v.grid))
            pics.append(render.token_grid_overlay(self.image, v.grid, kept, v.box))
            labels.append(f"{v.label} {kept.numel()}/{math.prod(v.grid)}")
        return pics[0] if len(pics) == 1 else render.side_by_side(pics, labels)

    def grounding_view(self, side: Side) -> tuple[Image.Image, list, dict[str, str]]:
        """(base image with heat map and point prompts, [(mask, label)], {label: colour}) for AnnotatedImage."""
        return render.grounding_layers(self.image, side.grounding or [], image_index=0)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def stats_markdown(side: Side, reference: Side | None = None) -> str:
    """The stats of one column as a Markdown table; ``reference`` (the full model's column) adds ratios."""
    st = side.output.stats
    rows = [("visual tokens into the LLM", f"{st.visual_tokens_kept} / {st.visual_tokens_in}")]
    if st.visual_tokens_final != st.visual_tokens_kept:
        rows.append(("visual tokens in the last layer", f"{st.visual_tokens_final}"))
    for s in st.stages:
        where = f"layer {s['layer']}" if s.get("layer") is not None else s["stage"]
        if "important_share" in s:
            rows.append((f"{s['method']} @ {where}", f"{100 * s['important_share']:.1f}% important, KV {s['kv']}"))
        elif "visual_tokens_in" in s:
            rows.append((f"{s['method']} @ {where}", f"{s['visual_tokens_in']} → {s['visual_tokens_kept']}"))
        elif "summary" in s:  # reweighting / decoding methods describe themselves
            rows.append((f"{s['method']} @ {where}", str(s["summary"])))
        else:
            rest = ", ".join(f"{k} {v}" for k, v in s.items() if k not in ("stage", "method", "layer"))
            rows.append((f"{s['method']} @ {where}", rest.replace("|", "/")))
    rows += [
        ("prefill (time to first token)", f"{1000 * st.prefill_s:.1f} ms"),
        ("… vision tower / pruning / LLM", f"{1000 * st.vision_s:.1f} / {1000 * st.scoring_s:.1f} / "
                                          f"{1000 * st.llm_prefill_s:.1f} ms"),
        ("decode", "–" if st.decode_ms_per_token is None else f"{st.decode_ms_per_token:.2f} ms/token"),
        ("new tokens", f"{st.new_tokens}"),
        ("KV cache after prefill", _fmt_bytes(st.kv_bytes)),
    ]
    if reference is not None:
        ref = reference.output.stats
        speed = ref.prefill_s / st.prefill_s if st.prefill_s > 0 and ref.prefill_s > 0 else None
        rows.append(("prefill speed-up vs full", "–" if speed is None else f"{speed:.2f}×"))
        if ref.kv_bytes:
            rows.append(("KV cache vs full", f"{100 * st.kv_bytes / ref.kv_bytes:.0f}%"))
    else:
        rows.append(("prefill speed-up", "1.00× (reference)"))
    return "| measure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def _generate_params(acc: VLMAccelerator) -> set[str]:
    try:
        return set(inspect.signature(acc.generate).parameters)
    except (TypeError, ValueError):  # pragma: no cover
        return set()


def grounding_supported(acc: VLMAccelerator) -> bool:
    """Whether this vlmfast's ``generate`` takes ``ground=`` (grounding, issue 7)."""
    return "ground" in _generate_params(acc)


def split_phrases(text: str | None) -> list[str]:
    """The phrases box: comma- or semicolon-separated phrases, blanks dropped."""
    return [p.strip() for p in (text or "").replace(";", ",").split(",") if p.strip()]


def refuse_server_paths(yaml_path: Path) -> None:
    """An uploaded policy may name shipped resources only (zoo names, shipped head files), never a path on the
    server: the error would tell a visitor whether a file exists. Refused before anything is opened, with the
    same message whatever the path; ``vlmfast demo --allow-policy-paths`` lifts this for a trusted setting."""
    import yaml

    try:
        data = yaml.safe_load(yaml_path.read_text())
    except (OSError, yaml.YAMLError):
        return  # load_policy reports it
    found: list[str] = []

    def walk(x, where: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if not where and k in ("name", "description", "models"):  # text and model-name patterns
                    continue
                walk(v, f"{where}.{k}" if where else str(k))
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")
        elif isinstance(x, str) and ("/" in x or "\\" in x or x.startswith(("~", "."))):
            found.append(where)

    walk(data, "")
    if found:
        raise PolicyError(f"the uploaded policy names a file path ({', '.join(found)}); an uploaded policy may only "
                          "name shipped resources (zoo names, shipped head files). Start the demo with "
                          "--allow-policy-paths to allow server paths")


# -- the engine -------------------------------------------------------------------------------------------------
class DemoEngine:
    """One loaded model, shared by every request; requests are served one at a time (a call installs hooks
    on the model for its duration, so two calls must not overlap)."""

    def __init__(self, acc: VLMAccelerator, model_name: str, *, max_pixels: int = MAX_PIXELS,
                 default_policy: str = "auto", warmup: bool = True, allow_policy_paths: bool = False):
        self.acc = acc
        self.allow_policy_paths = allow_policy_paths
        """may an uploaded policy name files on the server (a SAM checkpoint, a head file, a matcher folder)?"""
        self.model_name = model_name
        self.max_pixels = int(max_pixels)
        self.lock = threading.Lock()
        self.can_ground = grounding_supported(acc)
        self.can_ground_phrases = "ground_phrases" in _generate_params(acc)
        self._accs: OrderedDict[str, VLMAccelerator] = OrderedDict()  # policy (as YAML) -> accelerator
        self._predictors: dict[tuple, Any] = {}  # (sam_type, checkpoint) -> SAM predictor, shared by policies
        self._grids: dict[tuple[int, int], list[TokenView]] = {}
        self.default_policy = self._default_policy_name(default_policy)
        if warmup:  # lazy initialisation (torch, transformers, SAM) must not be timed in the first request
            self.run(Image.new("RGB", (64, 64), (128, 128, 128)), "warm up", self.resolve_policy(self.default_policy),
                     ground=self.can_ground, max_new_tokens=2)

    @classmethod
    def load(cls, model: str = DEFAULT_MODEL, *, local_files_only: bool = False, device_map: Any = None,
             **kwargs) -> "DemoEngine":
        acc = VLMAccelerator.from_pretrained(model, policy=None, local_files_only=local_files_only,
                                             device_map=device_map)
        return cls(acc, model, **kwargs)

    # -- choices ---------------------------------------------------------------------------------------------
    def policy_choices(self) -> list[str]:
        return [NONE, *shipped_policies(), UPLOADED]

    def _default_policy_name(self, spec: str) -> str:
        if spec != "auto":
            if spec not in self.policy_choices():
                raise PolicyError(f"demo policy {spec!r}: expected 'auto' or one of {', '.join(self.policy_choices())}")
            return spec
        pol, _ = default_policy_for(self.model_name)
        for stem, path in shipped_policies().items():
            if pol.source == str(path):
                return stem
        return NONE

    def resolve_policy(self, choice: str, yaml_path: str | None = None) -> Policy:
        """The policy the dropdown names (or the uploaded YAML), checked against the model."""
        if choice == UPLOADED:
            if not yaml_path:
                raise PolicyError("policy 'uploaded YAML' is selected but no YAML file was uploaded")
            if not self.allow_policy_paths:
                refuse_server_paths(Path(yaml_path))
            policy = load_policy(Path(yaml_path))
        elif choice == NONE or not choice:
            policy = Policy(source="<none>")
        elif choice in shipped_policies():
            policy = load_policy(choice)
        else:
            raise PolicyError(f"unknown policy {choice!r}; expected one of {', '.join(self.policy_choices())}")
        return policy

    # -- inputs ----------------------------------------------------------------------------------------------
    def open_image(self, image: Any) -> Image.Image:
        """An RGB PIL image from a path or a PIL image; refuses non-images and images over ``max_pixels``
        (checked from the header, before decoding)."""
        if image is None:
            raise InputError("no image: upload one or pick an example")
        if isinstance(image, Image.Image):
            self._check_size(*image.size)
            return to_rgb(image)
        try:
            with Image.open(image) as im:
                self._check_size(*im.size)
                im.load()
                return to_rgb(im)
        except InputError:
            raise
        except Image.DecompressionBombError as e:
            raise InputError(f"the image is too large: {e}") from None
        except UnidentifiedImageError:
            raise InputError(f"{Path(str(image)).name} is not an image this demo can read "
                             "(PNG, JPEG, WebP, ...)") from None
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read the image {Path(str(image)).name}: {e}") from None

    def _check_size(self, w: int, h: int) -> None:
        if w * h > self.max_pixels:
            raise InputError(f"the image is too large: {w}x{h} = {w * h / 1e6:.1f} megapixels; the limit is "
                             f"{self.max_pixels / 1e6:.0f} megapixels (the model downsizes it anyway)")
        if min(w, h) < 1:
            raise InputError(f"the image is empty ({w}x{h})")

    def token_views(self, image: Image.Image) -> list[TokenView]:
        """The image's token grids as the model builds them, each with the pixels it covers (cached per image
        size): one for most families, a base and a high-resolution view for LLaVA-NeXT."""
        key = image.size
        if key not in self._grids:
            acc = self.acc
            with torch.inference_mode(), acc.adapter.preserved_state():
                inputs = acc.adapter.prepare(acc.processor, [[image]], [""])
                tokens = acc.adapter.image_tokens(inputs, None)
            box = acc.adapter.grid_region(acc.processor, image.size)
            names = [""] if len(tokens) == 1 else ["base", "high-res"] if len(tokens) == 2 else \
                [f"view {k}" for k in range(len(tokens))]
            self._grids[key] = [TokenView(name, (int(v.grid[0]), int(v.grid[1]), int(v.grid[2])), v.pixel_box(box))
                                for name, v in zip(names, tokens)]
        return self._grids[key]

    # -- one request -----------------------------------------------------------------------------------------
    def accelerator(self, policy: Policy) -> VLMAccelerator:
        """The accelerator for ``policy`` on the shared model (kept for the last few policies, so a policy's SAM
        predictor and other per-accelerator state load once; policies with the same SAM share one)."""
        key = policy.to_yaml()
        acc = self._accs.get(key)
        if acc is None:
            acc = VLMAccelerator(self.acc.model, self.acc.processor, policy=policy)
            if self.can_ground:
                self._share_predictor(acc)
            self._accs[key] = acc
            while len(self._accs) > 8:
                self._accs.popitem(last=False)
        self._accs.move_to_end(key)
        return acc

    def _share_predictor(self, acc: VLMAccelerator) -> None:
        grounder = getattr(acc, "grounder", None)
        cfg = getattr(grounder, "cfg", None)
        if grounder is None or cfg is None:
            return
        key = (getattr(cfg, "sam_type", None), getattr(cfg, "sam_checkpoint", None))
        if key in self._predictors:
            grounder.predictor = self._predictors[key]
        else:  # the first accelerator with this SAM loads it
            self._predictors[key] = grounder.predictor

    def _side(self, title: str, policy: Policy, image: Image.Image, prompt: str, ground: bool,
              max_new_tokens: int, phrases: list[str]) -> Side:
        acc = self.accelerator(policy)
        kwargs: dict[str, Any] = {"max_new_tokens": int(max_new_tokens)}
        grounded = bool(ground and self.can_ground)
        if grounded:
            kwargs["ground"] = True
            if phrases and self.can_ground_phrases:
                kwargs["ground_phrases"] = phrases
        out = acc.generate(images=[image], prompt=prompt, **kwargs)
        return Side(title, acc.policy, out, getattr(out, "grounding", None) if grounded else None)

    def run(self, image: Any, prompt: str, policy: Policy, *, ground: bool = True, max_new_tokens: int = 24,
            phrases: str | list[str] | None = None, notes: list[str] | None = None) -> DemoResult:
        """Answer ``prompt`` about ``image`` with the plain model and with ``policy``, in one request.
        ``phrases``: phrases of the prompt to ground besides the answer's object words."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: ask something about the image")
        if not 1 <= int(max_new_tokens) <= 512:
            raise InputError(f"max new tokens must be in [1, 512], got {max_new_tokens}")
        img = self.open_image(image)
        phrases = split_phrases(phrases) if isinstance(phrases, str) or phrases is None else list(phrases)
        notes = list(notes or [])
        if ground and not self.can_ground:
            notes.append("grounding not available in this vlmfast build (no `ground=` in VLMAccelerator.generate)")
        elif ground and phrases and not self.can_ground_phrases:
            notes.append("phrases to ground: not supported by this vlmfast build (answer object words only)")
        with self.lock:
            views = self.token_views(img)
            full = self._side("full model", Policy(source="<none>"), img, prompt.strip(), ground, max_new_tokens,
                              phrases)
            tuned = self._side("with policy", policy, img, prompt.strip(), ground, max_new_tokens, phrases)
        return DemoResult(img, views, full, tuned, notes)
