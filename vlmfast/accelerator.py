"""One request end to end: encode -> vision stage -> prefill (layer stage) -> decode -> report.

See docs/architecture.md for the walk of a request and the invariants each step keeps.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from . import attention
from ._compat import CACHE_KW, cache_of
from .adapters import adapter_for
from .adapters.base import ImageTokens
from .decoding import GenerationArgs, TokenChooser, kv_cache_bytes
from .errors import InputError, PolicyError
from .layer_stage import LayerStage, gather_seq
from .reweight.branches import BranchContext, Branches, vision_attention_layer
from .policy import default_policy_for, load_policy
from .stats import Stats

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


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _load_image(x: Any, where: str):
    from PIL import Image

    if isinstance(x, Image.Image):
        return x.convert("RGB") if x.mode != "RGB" else x
    if isinstance(x, (str, Path)):
        try:
            with Image.open(x) as im:
                return im.convert("RGB")
        except (OSError, ValueError) as e:
            raise InputError(f"{where}: cannot open image file {str(x)!r}: {e}") from None
    try:
        import numpy as np

        if isinstance(x, np.ndarray) and x.ndim == 3 and x.shape[2] in (3, 4):
            return Image.fromarray(x.astype("uint8")).convert("RGB")
    except ImportError:  # pragma: no cover
        pass
    raise InputError(
        f"{where}: expected a PIL image, an HxWx3 uint8 array or an image file path, got {type(x).__name__}"
    )


def _load_video(x: Any, where: str):
    """One video -> a (T, H, W, 3) uint8 array. Accepted: a list of frames (PIL images, HxWx3 uint8 arrays or
    image files, all of one size), a (T, H, W, 3) uint8 numpy array or tensor, a (T, 3, H, W) uint8 tensor or
    array (torchvision's TCHW)."""
    import numpy as np

    expected = ("expected a video: a list of frames (PIL images, HxWx3 uint8 arrays or image files), a (T, H, W, 3) "
                "uint8 array or a (T, 3, H, W) uint8 tensor")
    if isinstance(x, (list, tuple)):
        if not x:
            raise InputError(f"{where}: the video has no frames; {expected}")
        frames = [np.asarray(_load_image(f, f"{where}[{i}]")) for i, f in enumerate(x)]
        sizes = sorted({f.shape[:2] for f in frames})
        if len(sizes) > 1:
            raise InputError(f"{where}: all frames of a video must have one size, got (H, W) {sizes}")
        return np.stack(frames)
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise InputError(f"{where}: {expected}, got {type(x).__name__}{_hint(x)}")
    if x.ndim != 4 or not (x.shape[-1] == 3 or x.shape[1] == 3):
        hint = " (one frame? a video is T frames: stack them, or pass a list of frames)" if x.ndim == 3 else ""
        raise InputError(f"{where}: {expected}, got an array of shape {tuple(x.shape)}{hint}")
    if x.dtype not in (np.uint8, torch.uint8):
        raise InputError(f"{where}: expected uint8 pixel values (0-255), got {x.dtype}; convert e.g. with "
                         "(x * 255).round().astype('uint8') for values in [0, 1]")
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if x.shape[0] == 0:
        raise InputError(f"{where}: the video has no frames; {expected}")
    if x.shape[-1] != 3:  # (T, 3, H, W)
        x = x.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(x)


def _hint(x: Any) -> str:
    from PIL import Image

    if isinstance(x, Image.Image):
        return " (one frame: wrap the frame list in a list, videos=[frames])"
    if isinstance(x, (str, Path)):
        return (" (a path: vlmfast decodes no video files; pass the frames, e.g. a list of frame image paths, "
                "videos=[paths])")
    return ""


def _per_sample(items, n: int, single: bool, what: str) -> list:
    """One request's list (or a single item) -> [list]; a batch's list of per-prompt lists, checked."""
    if single:
        return [items]
    if items is None:
        return [None] * n
    if isinstance(items, (list, tuple)) and len(items) == n:
        return list(items)
    got = len(items) if isinstance(items, (list, tuple)) else 1
    raise InputError(f"a batch of {n} prompts needs a list of {n} {what} lists, got {got}")


def _normalise(images, prompt, videos=None) -> tuple[list[list], list[str], bool, list[list]]:
    """Accept one request (prompt str) or a batch (list of prompts); return per-sample image and video lists
    (videos as (T, H, W, 3) uint8 arrays)."""
    import numpy as np

    single = isinstance(prompt, str)
    prompts = [prompt] if single else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise InputError(f"prompt must be a string or a non-empty list of strings, got {type(prompt).__name__}")
    out = []
    for i, imgs in enumerate(_per_sample(images, len(prompts), single, "image")):
        if imgs is None:
            imgs = []
        elif not isinstance(imgs, (list, tuple)):
            imgs = [imgs]
        out.append([_load_image(im, f"images[{i}][{j}]" if not single else f"images[{j}]") for j, im in enumerate(imgs)])
    vids = []
    for i, vs in enumerate(_per_sample(videos, len(prompts), single, "video")):
        if vs is None or (not single and isinstance(vs, (list, tuple)) and not vs):
            vs = []
        elif isinstance(vs, (np.ndarray, torch.Tensor)) and vs.ndim == 4:
            vs = [vs]  # one video
        elif not isinstance(vs, (list, tuple)) or not vs:
            what = "an empty list (no video: leave videos=None)" if isinstance(vs, (list, tuple)) else type(vs).__name__
            raise InputError(f"videos{'' if single else f'[{i}]'}: expected a list of videos (videos=[frames]), got "
                             f"{what}")
        vids.append([_load_video(v, f"videos[{j}]" if single else f"videos[{i}][{j}]") for j, v in enumerate(vs)])
    return out, list(prompts), single, vids


def _prompt_order(images: list, videos: list, batch_images: list[list], batch_videos: list[list]) -> list:
    """The adapter's images and videos (each in request order) interleaved in sequence order: per sample its
    images, then its videos (the order ``prepare`` puts them in the prompt)."""
    it_i, it_v, out = iter(images), iter(videos), []
    for imgs, vids in zip(batch_images, batch_videos):
        out += [next(it_i) for _ in imgs] + [next(it_v) for _ in vids]
    return out


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
        self.policy.check(self.adapter.info())
        if len(self.policy.vision_pruners) > 1:
            raise PolicyError(f"{self.policy.source}: at most one vision-stage pruner per policy is supported")
        vision_attention_layer(self.policy, self.adapter)  # the pruner and DAMRO must read the same vision layer
        self._grounder = None

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
        """Load model + processor from a hub id, a local folder, or a vlmfast zoo name, then wrap them."""
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from .zoo import resolve

        path = resolve(model_id_or_path)
        try:
            model = AutoModelForImageTextToText.from_pretrained(
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

            grounding = per_sample_phrases(ground_phrases, len(prompts), single)
            self.grounder.prefetch(batch_images)  # SAM's image encoder overlaps the VLM (cfg.overlap)
        elif ground_phrases is not None:
            raise InputError("ground_phrases needs ground=True")
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
        outs = self._run(batch_images, prompts, GenerationArgs(max(len(f) for f in forced)), forced=forced,
                         batch_videos=batch_videos)
        return outs[0] if single else outs

    def _inputs(self, images, prompt, videos):
        """Normalised per-sample images, prompts, single flag and videos; videos only where the model takes them
        and the policy can use them."""
        batch_images, prompts, single, batch_videos = _normalise(images, prompt, videos)
        if any(batch_videos):
            adapter = self.adapter
            if not adapter.supports_video:
                from .adapters import ADAPTERS

                video = ", ".join(f"{c.title} ({'/'.join(c.model_classes)})" for c in ADAPTERS if c.supports_video)
                raise InputError(f"videos= is not supported for {type(self.model).__name__}: the {adapter.title} "
                                 f"family has no video input; only {video} family models take videos=. To show "
                                 "frames to this model, pass them as images=[...]")
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
        counts = [len(i) + len(v) for i, v in zip(batch_images, batch_videos)]  # visual inputs per sample
        t_start = _now(device)
        with torch.inference_mode(), adapter.preserved_state():
            inputs = adapter.prepare(self.processor, batch_images, prompts,
                                     videos=batch_videos if any(batch_videos) else None)
            t_pre = _now(device)
            # 1-2. encode, vision stage
            image_mask = adapter.image_token_mask(inputs)  # every visual placeholder: image and video tokens
            visual_in = image_mask.sum(1).tolist()  # before pruning; image_mask is re-bound by _assemble
            positions = adapter.positions(inputs)
            vp = policy.vision_pruners[0] if policy.vision_pruners else None
            attn_layer = vision_attention_layer(policy, adapter)  # the pruner's, else DAMRO's, else None
            needs_grey = any(p.needs_grey for p in policy.vision_pruners)
            images = _prompt_order(*adapter.visual_tokens(inputs, attn_layer, needs_grey), batch_images, batch_videos)
            t_vis = _now(device)
            n_feat = sum(im.n_tokens for im in images)
            if n_feat != int(image_mask.sum()):
                raise InputError(f"the processor produced {int(image_mask.sum())} image placeholders but the vision "
                                 f"tower {n_feat} features; check the processor matches the model")
            branches = Branches(self, policy, BranchContext(self, batch_images, prompts, inputs, images, image_mask,
                                                            positions, vp, attn_layer)) if policy.branch_methods else None
            kept, kept_scores = [], []
            for im in images:
                if vp is None:
                    kept.append(torch.arange(im.n_tokens, device=device))
                    continue
                res = vp.prune_visual(im)  # a video: per frame group
                im.features = im.features.index_copy(0, res.keep, res.features.to(im.features.dtype))  # merged
                kept.append(res.keep)
                kept_scores.append(res.scores)
            t_score = _now(device)
            embeds, mask, positions, image_mask = self._assemble(inputs, images, kept, image_mask, positions)
            valid = mask.bool()
            # 3. prefill, with layer-stage pruners driven by hooks + the attention function
            vision_scores = None
            if kept_scores and all(x is not None for x in kept_scores):
                vision_scores = torch.zeros(image_mask.shape, dtype=torch.float32, device=device)
                vision_scores[image_mask & valid] = torch.cat(kept_scores).float()
            stage = LayerStage(policy.layer_pruners, image_mask, valid, vision_scores)
            runs = [m.start(valid) for m in policy.attention_methods]
            runs += [m.start(adapter, inputs, image_mask, valid) for m in policy.reweighters]  # VAR
            runs += [m.start_run(image_mask, valid, images, kept, counts, stage)
                     for m in policy.sparse_prefill]  # MMInference: the sparse kernel of every layer
            ground = (self.grounder.begin(grounding, len(adapter.decoder_layers), valid, stage, image_mask)
                      if grounding is not None and forced is None else None)
            session = attention.AttentionSession(base="") if stage.needs_attention or runs or ground else None
            if stage.needs_attention:
                stage.register(session)
            if ground is not None:  # 6. grounding: an observer of every layer's (pre-reweighting) attention
                ground.capture.register(session)
            with ExitStack() as stack:
                stack.enter_context(attention.installed(model, session))
                stack.enter_context(stage.hooks(adapter.decoder_layers))
                if ground is not None:
                    stack.enter_context(ground.capture.hooks(adapter.decoder_layers,
                                                             ground.grounder.cfg.remove_sinks))
                for run in runs:
                    run.register(session, len(adapter.decoder_layers))
                    stack.enter_context(run.hooks(adapter.decoder_layers))
                t_llm = _now(device)
                out = model(inputs_embeds=embeds, attention_mask=mask,
                            position_ids=adapter.model_position_ids(positions), use_cache=True, logits_to_keep=1)
                cache = cache_of(out)
                for run in runs:  # 4. cache transforms (ZipVL's mixed-precision or evicted KV)
                    run.transform_cache(cache)
                if branches is not None:  # DAMRO / AGLA: each branch prefills into its own cache
                    branches.prefill()
                t_first = _now(device)
                kv = kv_cache_bytes(cache)
                adapter.set_decode_state(positions, valid)
                # 5. decode
                if forced is not None:
                    return self._score(out.logits[:, -1].float(), cache, mask, positions, valid, forced, branches)
                tokens, n_steps, t_dec = self._decode(out.logits[:, -1].float(), cache, inputs["input_ids"], mask,
                                                      positions, valid, args, branches)
        attn_s = adapter.last_attention_s if attn_layer is not None else 0.0
        t_ground = _now(device)
        groundings = None if ground is None else ground.finish(
            tokenizer=self.processor.tokenizer, processor=self.processor, adapter=adapter, inputs=inputs,
            positions=positions, valid=valid, image_mask=image_mask, images=images, kept=kept,
            batch_images=batch_images, tokens=tokens)
        ground_s = _now(device) - t_ground if ground is not None else 0.0
        layer_counts = self._layer_profile(image_mask, valid, stage)
        outs = []
        for b in range(len(prompts)):
            ids = tokens[b]
            n_in = int(visual_in[b])
            first = sum(counts[:b])
            own = range(first, first + counts[b])
            n_kept = int((image_mask[b] & valid[b]).sum())
            st = Stats(
                visual_tokens_in=n_in, visual_tokens_kept=n_kept,
                visual_tokens_final=layer_counts[b][-1] if layer_counts[b] else n_kept,
                layer_avg_visual_tokens=sum(layer_counts[b]) / max(1, len(layer_counts[b])),
                visual_tokens_per_layer=layer_counts[b], text_tokens=int(inputs["attention_mask"][b].sum()) - n_in,
                video_tokens_in=sum(images[i].n_tokens for i in own if images[i].kind == "video"),
                stages=self._stage_report(b, own, images, kept, vp, stage) + [r.report(b) for r in runs]
                + (branches.report(b) if branches is not None else []),
                preprocess_s=t_pre - t_start, vision_s=t_vis - t_pre - attn_s, scoring_s=t_score - t_vis + attn_s,
                llm_prefill_s=t_first - t_llm, prefill_s=t_first - t_pre,
                decode_ms_per_token=(1000 * t_dec / n_steps) if n_steps else None,
                new_tokens=len(ids), kv_bytes=kv[b], grounding_s=ground_s,
            )
            text = self.processor.batch_decode([ids], skip_special_tokens=True)[0].strip()
            outs.append(GenerateOutput(text=text, token_ids=ids, stats=st, kept=[kept[i] for i in own],
                                       grounding=None if groundings is None else groundings[b]))
        return outs

    def _assemble(self, inputs, images: list[ImageTokens], kept: list[torch.Tensor], image_mask, positions):
        """Embed the prompt, scatter image features, drop unkept image tokens, re-pad on the left."""
        input_ids, mask = inputs["input_ids"], inputs["attention_mask"]
        embeds = self.model.get_input_embeddings()(input_ids)
        if images:
            feats = torch.cat([im.features for im in images]).to(embeds.dtype)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), feats)
        if all(k.numel() == im.n_tokens for k, im in zip(kept, images)):
            return embeds, mask, positions, image_mask
        flat = torch.cat([torch.zeros(im.n_tokens, dtype=torch.bool, device=input_ids.device).index_fill_(0, k, True)
                          for im, k in zip(images, kept)])
        keep = mask.bool() & ~image_mask
        keep[image_mask] = flat
        width = int(keep.sum(1).max())
        # stable sort puts dropped tokens first and kept tokens last, both in their original order
        idx = torch.argsort(keep.to(torch.int8), dim=1, stable=True)[:, -width:]
        new_mask = keep.gather(1, idx)
        positions = torch.stack([gather_seq(p, idx) for p in positions]).masked_fill(~new_mask[None], 0)
        return gather_seq(embeds, idx), new_mask.to(mask.dtype), positions, image_mask.gather(1, idx) & new_mask

    def _decode(self, logits, cache, prompt_ids, mask, positions, valid, args: GenerationArgs, branches=None):
        """Greedy / sampled decoding; with ``branches`` (DAMRO, AGLA) the token is chosen from the combined logits
        and fed to every branch."""
        cfg = self.model.generation_config
        eos = cfg.eos_token_id
        eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=logits.device)
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
        chooser = TokenChooser(args, logits.device)
        next_pos = positions.masked_fill(~valid[None], -1).amax(-1, keepdim=True) + 1  # (R, B, 1)
        finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
        history = prompt_ids
        generated = []
        n_steps, t0 = 0, _now(logits.device)
        for step in range(args.max_new_tokens):
            tok = chooser(history, logits if branches is None else branches.combine(logits))
            tok = torch.where(finished, torch.full_like(tok, pad), tok)
            generated.append(tok)
            history = torch.cat([history, tok[:, None]], 1)
            if eos.numel():
                finished |= torch.isin(tok, eos)
            if bool(finished.all()) or step == args.max_new_tokens - 1:
                break
            logits, mask, next_pos = self._step(tok, cache, mask, next_pos)
            if branches is not None:
                branches.step(tok)
            n_steps += 1
        t_dec = _now(logits.device) - t0
        gen = torch.stack(generated, 1)
        tokens = []
        for b in range(gen.shape[0]):
            row = gen[b].tolist()
            if eos.numel():
                for i, t in enumerate(row):
                    if t in eos.tolist():
                        row = row[:i]
                        break
            tokens.append(row)
        return tokens, n_steps, t_dec

    def _step(self, tok, cache, mask, next_pos):
        """Feed one token per row; positions continue from the original (unpruned) maximum."""
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = self.model(input_ids=tok[:, None], attention_mask=mask, use_cache=True, **{CACHE_KW: cache},
                         position_ids=self.adapter.model_position_ids(next_pos))
        return out.logits[:, -1].float(), mask, next_pos + 1

    def _score(self, logits, cache, mask, positions, valid, forced: list[list[int]],
               branches=None) -> list[tuple[float, bool]]:
        """Teacher-force ``forced`` through the decode path; sum its log-probabilities, check greediness. With
        ``branches`` the distribution is softmax of the combined logits (tokens outside the plausible set: -inf)."""
        b = logits.shape[0]
        width = max(len(f) for f in forced)
        pad = self.model.generation_config.pad_token_id or 0
        tokens = torch.tensor([f + [pad] * (width - len(f)) for f in forced], device=logits.device)
        live = torch.tensor([[t < len(f) for t in range(width)] for f in forced], device=logits.device)
        logp = torch.zeros(b, dtype=torch.float64, device=logits.device)
        greedy = torch.ones(b, dtype=torch.bool, device=logits.device)
        next_pos = positions.masked_fill(~valid[None], -1).amax(-1, keepdim=True) + 1
        for t in range(width):
            tok = tokens[:, t]
            z = logits if branches is None else branches.combine(logits)
            lp = z.log_softmax(-1).gather(1, tok[:, None])[:, 0]
            logp += torch.where(live[:, t], lp.double(), torch.zeros_like(logp))
            greedy &= ~live[:, t] | (z.argmax(-1) == tok)
            if t == width - 1:
                break
            logits, mask, next_pos = self._step(tok, cache, mask, next_pos)
            if branches is not None:
                branches.step(tok)
        return [(float(logp[i]), bool(greedy[i])) for i in range(b)]

    def _layer_profile(self, image_mask, valid, stage: LayerStage) -> list[list[int]]:
        """Visual tokens present in each decoder layer, per sample."""
        n_layers = len(self.adapter.decoder_layers)
        base = (image_mask & valid).sum(1).tolist()
        prof = [[base[b]] * n_layers for b in range(len(base))]
        for st, rep in zip(stage.stages, stage.report):
            for b, k in enumerate(rep["visual_tokens_kept"]):
                for layer in range(st.layer, n_layers):
                    prof[b][layer] = k
        return prof

    def _stage_report(self, b, own: range, images, kept, vp, stage: LayerStage) -> list[dict]:
        """``own``: the indices of sample b's visual inputs in ``images`` / ``kept``."""
        rows = []
        if vp is not None:
            rows.append({"stage": "vision", "method": vp.method_name, "layer": None,
                         "visual_tokens_in": sum(images[i].n_tokens for i in own),
                         "visual_tokens_kept": sum(int(kept[i].numel()) for i in own)})
        for rep in stage.report:
            rows.append({**rep, "visual_tokens_in": rep["visual_tokens_in"][b],
                         "visual_tokens_kept": rep["visual_tokens_kept"][b]})
        return rows

