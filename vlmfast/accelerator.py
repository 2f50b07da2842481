"""One request end to end: encode -> vision stage -> prefill (layer stage) -> decode -> report.

See docs/architecture.md for the walk of a request and the invariants each step keeps.
"""

from __future__ import annotations

import logging
import threading
import weakref
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence, cast

import torch

from . import attention
from ._compat import cache_of
from .adapters import adapter_for
from .decoding import GenerationArgs, decode, kv_cache_bytes, score
from .errors import InputError, PolicyError, UnsupportedModelError
from .inputs import normalise_request
from .layer_stage import LayerStage
from .policy import default_policy_for, load_policy
from .request import Request, assemble, context_length, encode, prefill, prune_visual
from .reweight.branches import Branches
from .stats import Stats, now

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger("vlmfast")

AUTO = "auto"


@dataclass
class GenerateOutput:
    text: str
    token_ids: list[int]
    stats: Stats
    kept: list[torch.Tensor] = field(default_factory=list, repr=False)
    """per visual input (the images, then the videos), the indices of its visual tokens that entered the language
    model (a video's indices run over its frame groups: group g's tokens are g*h*w ... (g+1)*h*w - 1)"""
    grounding: list | None = field(default=None, repr=False)
    """with ``ground=True``: one :class:`vlmfast.grounding.Grounding` per grounded phrase (map, points, mask)"""


_WARNED_FOREIGN: set[tuple[str, str]] = set()


def _warn_foreign_policy(policy, model_name: str) -> None:
    """Once per (policy, model): the policy's ``models`` name other models (it was tuned for them)."""
    key = (policy.source, model_name)
    if policy.is_for(model_name) is False and key not in _WARNED_FOREIGN:
        _WARNED_FOREIGN.add(key)
        log.warning("vlmfast: policy %s is for %s, not %s; its layers and budgets may not suit this model",
                    policy.name or policy.source, ", ".join(policy.models), model_name)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.RLock:
    """The lock every vlmfast call on ``model`` holds: a call installs hooks, the attention implementation and
    per-request state on the model's shared modules (and a shared SAM predictor is stateful), so calls on one
    model object run one at a time, whichever accelerator or thread makes them. Different models run in
    parallel. Plain ``model.generate`` calls from other threads are not serialised: do not mix them with
    vlmfast calls on the same model."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


def _model_class(path: str, given: str, local_files_only: bool) -> type[PreTrainedModel]:
    """The transformers class ``AutoModelForImageTextToText`` would load ``path`` as, checked against vlmfast's
    adapters; clear errors for a missing folder, a folder without config.json and an unsupported family."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForImageTextToText

    from .adapters import adapter_class_for, supported_families

    folder = Path(path).expanduser()
    looks_local = folder.is_absolute() or path.startswith((".", "~")) or folder.exists() or path.count("/") > 1
    if looks_local and not folder.exists():
        raise InputError(f"model {given!r}: no such folder {str(folder)!r} (expected a model folder, a hub id such "
                         "as llava-hf/llava-1.5-7b-hf, or a zoo name: vlmfast.zoo.available())")
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise InputError(f"model {given!r}: the folder {str(folder)!r} has no config.json (expected a folder "
                         "written by save_pretrained, with config.json, weights and the processor's files)")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_files_only)
    except (OSError, ValueError) as e:
        raise InputError(f"cannot load {given!r} (local_files_only={local_files_only}): {e}") from None
    mapping = AutoModelForImageTextToText._model_mapping
    # cast: transformers types the lazy mapping's values as (slow, fast) tokenizer pairs; a model mapping's are
    # one model class each
    model_class = cast("type[PreTrainedModel]", mapping[type(config)]) if type(config) in mapping else None
    if model_class is None or adapter_class_for(model_class) is None:
        what = model_class.__name__ if model_class is not None else f"a {config.model_type!r} model"
        raise UnsupportedModelError(f"{given!r} is {what}, which vlmfast has no adapter for; supported families: "
                                    f"{supported_families()}")
    return model_class


class VLMAccelerator:
    """Wrap a loaded transformers VLM and apply a policy to every ``generate`` call.

    ``policy``: a shipped name (``"llava-1.5-7b"``), a YAML path, a dict, a :class:`Policy`, ``None`` for no
    methods, or ``"auto"`` (default) for the shipped policy matching the model's name, else no methods.
    The model is never modified outside a call: hooks and the attention implementation are installed for
    the call and removed after it, even on error.
    """

    def __init__(self, model, processor=None, policy: Any = AUTO):
        self.model = model
        self.adapter = adapter_for(model)
        self.processor = processor if processor is not None else self._load_processor(model)
        name = getattr(model, "name_or_path", "") or ""
        if isinstance(policy, str) and policy == AUTO:
            self.policy, why = default_policy_for(name)
            self.policy_origin = why
            log.info("vlmfast: policy for %s: %s", name or type(model).__name__, why)
        else:
            self.policy = load_policy(policy)
            self.policy_origin = f"given: {self.policy.source}"
            _warn_foreign_policy(self.policy, name)
        self.policy.check(self.adapter.info())
        if len(self.policy.vision_pruners) > 1:
            raise PolicyError(f"{self.policy.source}: at most one vision-stage pruner per policy is supported")
        self.policy.vision_attention_layer(self.adapter)  # the pruner and DAMRO must read the same vision layer
        self._grounder = None
        self._warned_context = False

    @property
    def grounder(self):
        """The grounding stage of ``generate(..., ground=True)``: the policy's ``grounding`` config and a SAM
        predictor loaded on first use (assign ``acc.grounder.predictor`` to use another one)."""
        if self._grounder is None:
            from .grounding.pipeline import Grounder

            self._grounder = Grounder(self.policy.grounding, self.model.device)
        return self._grounder

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, policy: Any = AUTO, *, local_files_only: bool = False,
                        dtype: Any = "auto", device_map: Any = None, **model_kwargs) -> "VLMAccelerator":
        """Load model + processor from a hub id, a local folder, or a vlmfast zoo name, then wrap them. The config is
        read first: a family vlmfast has no adapter for is refused before any weights load."""
        from transformers import AutoProcessor

        from .zoo import resolve

        path = resolve(model_id_or_path)
        model_class = _model_class(path, model_id_or_path, local_files_only)
        try:
            model = model_class.from_pretrained(
                path, dtype=dtype, device_map=device_map, local_files_only=local_files_only, **model_kwargs
            )
            processor = AutoProcessor.from_pretrained(path, local_files_only=local_files_only)
        except OSError as e:
            raise InputError(
                f"cannot load {model_id_or_path!r} (local_files_only={local_files_only}): {e}"
            ) from None
        model.eval()
        return cls(model, processor, policy=policy)

    @staticmethod
    def _load_processor(model):
        from transformers import AutoProcessor

        name = getattr(model, "name_or_path", "") or ""
        if not name:
            raise InputError("the model has no name_or_path to load its processor from; pass processor=...")
        try:
            return AutoProcessor.from_pretrained(name)
        except OSError as e:
            raise InputError(f"cannot load the processor of {name!r}: {e}; pass processor=...") from None

    # -- public API ------------------------------------------------------------------------------------------
    def generate(self, images=None, prompt: str | Sequence[str] = "", *, videos=None, max_new_tokens: int = 64,
                 do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 repetition_penalty: float = 1.0, seed: int | None = None, ground: bool = False,
                 ground_phrases: str | Sequence[str] | Sequence[Sequence[str]] | None = None):
        """Answer one request (``prompt`` a string, ``images`` an image or a list) or a batch (``prompt`` a
        list, ``images`` a list of per-prompt image lists). Returns a GenerateOutput or a list of them.

        ``videos`` (Qwen2-VL-family models): a list of videos for one request (a batch: a list of per-prompt video
        lists), each a list of frames (PIL images / HxWx3 uint8 arrays / image files), a (T, H, W, 3) uint8 array
        or a (T, 3, H, W) uint8 tensor. The prompt shows the images, then the videos, then the text.

        ``ground=True`` fills ``out.grounding``: a mask (with its attention map and point prompts) for each object
        word of the answer and each of ``ground_phrases`` (phrases of the prompt, e.g. a referring expression)."""
        args = GenerationArgs(max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty, seed)
        batch_images, prompts, single, batch_videos = self._inputs(images, prompt, videos)
        grounding = None
        if ground and any(batch_videos):
            raise InputError("ground=True works on images only: grounding maps attention back to image pixels and has "
                             "no video path; pass the frame to ground as images=[frame]")
        if ground:
            from .grounding.pipeline import per_sample_phrases

            bare = [i for i, imgs in enumerate(batch_images) if not imgs]
            if bare:
                where = "the request has" if single else f"prompt[{bare[0]}] has"
                raise InputError(f"ground=True needs an image to ground in, and {where} none; pass images=[...] "
                                 "(or ground=False)")

            grounding = per_sample_phrases(ground_phrases, len(prompts), single)
        elif ground_phrases is not None:
            raise InputError("ground_phrases needs ground=True")
        with model_lock(self.model):
            if grounding is not None:
                self.grounder.prefetch(batch_images)  # SAM's image encoder overlaps the VLM (cfg.overlap)
            outs = self._run(batch_images, prompts, args, grounding=grounding, batch_videos=batch_videos)
        return outs[0] if single else outs

    def loglikelihood(self, images=None, prompt: str | Sequence[str] = "", continuation: str | Sequence[str] = "", *,
                      videos=None):
        """log p(continuation | images, videos, prompt) under the policy, and whether greedy decoding would produce
        exactly the continuation. ``continuation`` is the assistant's reply (tokenised without special tokens).
        Batched like ``generate``; returns (logprob, is_greedy) or a list of them."""
        batch_images, prompts, single, batch_videos = self._inputs(images, prompt, videos)
        conts = [continuation] if isinstance(continuation, str) else list(continuation)
        if len(conts) != len(prompts) or not all(isinstance(c, str) for c in conts):
            raise InputError(f"need one continuation string per prompt ({len(prompts)}), got {continuation!r}")
        forced = [self.processor.tokenizer(c, add_special_tokens=False)["input_ids"] for c in conts]
        if any(not f for f in forced):
            raise InputError("every continuation must contain at least one token")
        with model_lock(self.model):
            outs = self._run(batch_images, prompts, GenerationArgs(max(len(f) for f in forced)), forced=forced,
                             batch_videos=batch_videos)
        return outs[0] if single else outs

    def _inputs(self, images, prompt, videos):
        """Normalised per-sample images, prompts, single flag and videos; videos only where the model takes them
        and the policy can use them."""
        batch_images, prompts, single, batch_videos = normalise_request(images, prompt, videos)
        placeholders = self.adapter.placeholders(self.processor)
        for i, p in enumerate(prompts):
            for token in placeholders:
                if token in p:
                    raise InputError(f"prompt{'' if single else f'[{i}]'} contains {token!r}, the model's visual "
                                     "placeholder: vlmfast writes the placeholders itself, one set per image or video "
                                     "passed in images= / videos=; remove it from the prompt")
        if any(batch_videos):
            adapter = self.adapter
            if not adapter.supports_video:
                from .adapters import ADAPTERS

                video = ", ".join(f"{c.title} ({'/'.join(c.model_classes)})" for c in ADAPTERS if c.supports_video)
                why = adapter.video_unsupported or f"the {adapter.title} family has no video input"
                raise InputError(f"videos= is not supported for {type(self.model).__name__}: {why}; only {video} "
                                 "family models take videos=. To show frames to this model, pass them as images=[...]")
            if self.policy.branch_methods:
                names = ", ".join(m.method_name for m in self.policy.branch_methods)
                raise InputError(f"videos= cannot be combined with the policy's decode-branch methods ({names}): they "
                                 "rebuild the request from its images and have no video path")
        return batch_images, prompts, single, batch_videos

    # -- the walk of a request -------------------------------------------------------------------------------
    def _run(self, batch_images: list[list], prompts: list[str], args: GenerationArgs,
             forced: list[list[int]] | None = None, grounding: list[list[str]] | None = None,
             batch_videos: list[list] | None = None) -> list:
        model, adapter, policy = self.model, self.adapter, self.policy
        device = model.device
        batch_videos = batch_videos or [[] for _ in prompts]
        vp = policy.vision_pruners[0] if policy.vision_pruners else None
        attn_layer = policy.vision_attention_layer(adapter)  # the pruner's, else DAMRO's, else None
        t_start = now(device)
        with torch.inference_mode(), adapter.preserved_state():
            # 1-2. encode, vision stage
            enc = encode(adapter, self.processor, batch_images, prompts, batch_videos, attn_layer,
                         grey=any(p.needs_grey for p in policy.vision_pruners),
                         means_only=policy.reads_attention_means_only,
                         instruction=any(p.needs_instruction for p in policy.vision_pruners),
                         resample=any(p.needs_resample for p in policy.vision_pruners))
            t_vis = now(device)
            t_pre = t_start + enc.prepare_s
            self._warn_past_context(enc, args.max_new_tokens)
            visual, kept, kept_scores = prune_visual(vp, enc.visual)
            t_score = now(device)
            seq = assemble(model, enc, visual, kept)
            valid = seq.valid
            vision_scores = None
            scored = [x for x in kept_scores if x is not None]
            if vp is not None and len(scored) == len(kept_scores):
                vision_scores = torch.zeros(seq.image_mask.shape, dtype=torch.float32, device=device)
                if scored:  # a text-only request has no visual tokens to score
                    vision_scores[seq.image_mask & valid] = torch.cat(scored).float()
            stage = LayerStage(policy.layer_pruners, seq.image_mask, valid, vision_scores)
            req = Request(model, adapter, self.processor, prompts, batch_images, batch_videos, enc, visual, kept, seq,
                          vp, attn_layer, vision_scores, stage)
            # 3. prefill: on one attention session, the layer stage, the grounding capture, then the runs of the
            # policy's methods in policy order (vision, layer and decoding methods start none)
            runs = [r for m in policy.methods if (r := m.start(req)) is not None]
            ground = (self.grounder.begin(req, grounding) if grounding is not None and forced is None else None)
            parts: list = [stage] + ([ground] if ground is not None else []) + runs
            session = attention.AttentionSession(base="") if stage.needs_attention or runs or ground else None
            branches = Branches(req, policy) if policy.branch_methods else None
            with ExitStack() as stack:
                stack.enter_context(attention.installed(model, session))
                for part in parts:
                    if session is not None:
                        part.register(session)
                    stack.enter_context(part.hooks(adapter.decoder_layers))
                t_llm = now(device)
                out = prefill(model, adapter, seq, stage.columns)
                cache = cache_of(out)
                for run in runs:  # 4. cache transforms (ZipVL's mixed-precision or evicted KV)
                    run.transform_cache(cache)
                if branches is not None:  # DAMRO / AGLA: each branch prefills into its own cache
                    branches.prefill()
                t_first = now(device)
                kv = kv_cache_bytes(cache)
                adapter.set_decode_state(seq.positions, valid)
                # 5. decode
                logits = out.logits[:, -1].float()
                if forced is not None:
                    return score(model, adapter, logits, cache, seq.mask, seq.positions, valid, forced, branches)
                tokens, n_steps, t_dec = decode(model, adapter, logits, cache, enc.inputs["input_ids"], seq.mask,
                                                seq.positions, valid, args, branches)
        attn_s = adapter.last_attention_s if attn_layer is not None else 0.0
        t_ground = now(device)
        groundings = None if ground is None else ground.finish(req, tokens)
        ground_s = now(device) - t_ground if ground is not None else 0.0
        layer_counts = self._layer_profile(req)
        outs = []
        for b in range(len(prompts)):
            ids = tokens[b]
            own = req.own(b)
            n_in = int(enc.image_mask[b].sum())
            n_kept = int((seq.image_mask[b] & valid[b]).sum())
            reports = [r for r in (run.report(b) for run in runs) if r is not None]
            st = Stats(
                visual_tokens_in=n_in, visual_tokens_kept=n_kept,
                visual_tokens_final=layer_counts[b][-1] if layer_counts[b] else n_kept,
                layer_avg_visual_tokens=sum(layer_counts[b]) / max(1, len(layer_counts[b])),
                visual_tokens_per_layer=layer_counts[b], text_tokens=int(enc.inputs["attention_mask"][b].sum()) - n_in,
                video_tokens_in=sum(enc.visual[i].n_tokens for i in own if enc.visual[i].kind == "video"),
                stages=self._stage_report(req, b) + reports + (branches.report(b) if branches is not None else []),
                preprocess_s=t_pre - t_start, vision_s=t_vis - t_pre - attn_s, scoring_s=t_score - t_vis + attn_s,
                llm_prefill_s=t_first - t_llm, prefill_s=t_first - t_pre,
                decode_ms_per_token=(1000 * t_dec / n_steps) if n_steps else None,
                new_tokens=len(ids), kv_bytes=kv[b], grounding_s=ground_s, batch_size=len(prompts),
            )
            text = self.processor.batch_decode([ids], skip_special_tokens=True)[0].strip()
            outs.append(GenerateOutput(text=text, token_ids=ids, stats=st, kept=[kept[i] for i in own],
                                       grounding=None if groundings is None else groundings[b]))
        return outs

    def _warn_past_context(self, enc, max_new_tokens: int) -> None:
        """Once per accelerator: decoding may run past the model's context (the prompt fits, checked in encode)."""
        limit = context_length(self.adapter)
        end = int(enc.positions.max()) + 1 + max_new_tokens
        if limit is not None and end > limit and not self._warned_context:
            self._warned_context = True
            log.warning("vlmfast: prompt + max_new_tokens reach position %d, past the language model's %d "
                        "(max_position_embeddings); the last tokens are generated beyond its context", end, limit)

    def _layer_profile(self, req: Request) -> list[list[int]]:
        """Visual tokens present in each decoder layer, per sample."""
        n_layers = req.n_layers
        base = (req.image_mask & req.valid).sum(1).tolist()
        prof = [[base[b]] * n_layers for b in range(len(base))]
        for st, rep in zip(req.stage.stages, req.stage.report):
            for b, k in enumerate(rep["visual_tokens_kept"]):
                for layer in range(st.layer, n_layers):
                    prof[b][layer] = k
        return prof

    def _stage_report(self, req: Request, b: int) -> list[dict]:
        """Sample b's rows for the vision stage and the layer stages."""
        rows = []
        own = req.own(b)
        if req.vision_pruner is not None:
            rows.append({"stage": "vision", "method": req.vision_pruner.method_name, "layer": None,
                         "visual_tokens_in": sum(req.encoded.visual[i].n_tokens for i in own),
                         "visual_tokens_kept": sum(int(req.kept[i].numel()) for i in own)})
        for rep in req.stage.report:
            rows.append({**rep, "visual_tokens_in": rep["visual_tokens_in"][b],
                         "visual_tokens_kept": rep["visual_tokens_kept"][b]})
        return rows
