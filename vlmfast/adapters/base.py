"""The adapter contract: everything that differs between model families lives behind it.

An adapter knows, for one family, how to build inputs with the model's own processor, where the image
(and video) tokens are, how the vision tower is run and how one of its layers' attention is read, what the grid
of each image or video is, and how positions are laid out (1-D for LLaVA, 4-row M-RoPE for the Qwen families).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, cast

import torch
from torch import nn

from ..errors import PolicyError

log = logging.getLogger("vlmfast")


@dataclass
class ImageTokens:
    """One image (or video) as the language model sees it.

    ``features``: (n, d_model) projected features, one row per LLM image token, in raster order.
    ``grid``: (t, h, w) of those tokens (n == t*h*w); t > 1 only for videos, one step per *frame group* (the
    frames the tower folds into one token: the Qwen towers' ``temporal_patch_size`` = 2).
    ``attention``: (N, N) head-averaged self-attention of the scoring vision layer over the image's patches
    (CLS row/column removed), or None when no pruner asked for it. ``patches_per_token`` patches (consecutive
    in that matrix) make one LLM token (4 for the Qwen towers' 2x2 merger, 1 for LLaVA). For a video whose tower
    attends within each frame group only (the Qwen towers), ``attention`` is (t, N/t, N/t): one block per frame group.
    ``received`` / ``given``: (N,) the column and row means of that matrix (the attention each patch receives from
    the image's patches / pays to them, averaged over heads); for a block-diagonal video, per block. An adapter may
    fill only these, without the (N, N) matrix, when every method that reads the attention needs only them
    (``means_only``: FoPru, FasterVLM's and DAMRO's received-attention fallbacks); read them with
    :meth:`attention_means`, which derives them from the matrix otherwise.
    ``cls_attention``: (n,) attention the CLS token pays to each LLM token (summed over the token's
    ``patches_per_token`` patches: InternVL's 2 x 2), when the tower has a CLS token.
    ``keys``: (n, d) keys of the scoring layer averaged over heads, one row per LLM token (patch keys
    averaged within a merged token), when attention was captured.
    """

    features: torch.Tensor
    grid: tuple[int, int, int]
    attention: torch.Tensor | None = None
    patches_per_token: int = 1
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    grey: torch.Tensor | None = None
    """(n, P) grey values in [0, 255] of the pixels under each LLM token (for entropy-based scores), when asked
    for (``grey=True``: a vision pruner's ``needs_grey``)"""
    kind: str = "image"
    """"image" or "video" (sparse prefill layouts name the span's kind)"""
    view: int = 0
    """0: an image's first (or only) view; k > 0: its further views, right after it in the sequence (LLaVA-NeXT's
    high-resolution grid after the base view). Each view has its own grid; pruners prune each view on its own"""
    region: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    """the part of the image's grid region (``Adapter.grid_region``) this view covers, as fractions (x0, y0, x1, y1)"""
    fixed: torch.Tensor | None = None
    """(m, d_model): features of tokens the language model receives with this input that no method prunes, scores
    or counts as visual (LLaVA's CLS token under ``vision_feature_select_strategy="full"``); they fill the
    adapter's ``fixed_token_mask`` positions and keep them"""
    received: torch.Tensor | None = None
    given: torch.Tensor | None = None
    deepstack: torch.Tensor | None = None
    """(levels, n, d_model): features the family adds to the hidden states of its first ``levels`` decoder layers at
    this input's positions (Qwen3-VL's DeepStack), one row per LLM token like ``features``; pruning drops the same
    rows from every level"""
    resample: Callable[[tuple[int, int]], torch.Tensor] | None = None
    """``resample((h, w))``: (h * w, d_model) features the language model would receive for this image with the tower's
    input resized to an h x w grid of LLM tokens (``Adapter.resampled_features``), when a vision pruner asks for it
    (``needs_resample``: downsample); None for videos and families that cannot resize (``resample_unsupported``)"""
    instruction: torch.Tensor | None = None
    """(m, d_model): the instruction of the sample this input belongs to (its prompt's tokens, without the chat
    template, through the language model's input embedding layer), when a vision pruner asks for it
    (``needs_instruction``: CDPruner); (0, d_model) for an empty prompt. Filled by ``request.encode``, the same for
    every family"""

    @property
    def n_tokens(self) -> int:
        return self.features.shape[0]

    def attention_means(self, method: str = "this method") -> tuple[torch.Tensor, torch.Tensor]:
        """(received, given): the column and row means of the scoring layer's (N, N) attention over the patches
        (per frame-group block for a (t, N/t, N/t) video), from ``received`` / ``given`` or from the matrix."""
        if self.received is not None and self.given is not None:
            return self.received, self.given
        if self.attention is None:
            raise RuntimeError(f"{method} needs the vision layer's attention; the adapter did not capture it")
        a = self.attention.float()
        return a.mean(-2).reshape(-1), a.mean(-1).reshape(-1)

    def pixel_box(self, image_box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        """The pixels (x0, y0, x1, y1) this view covers, given the box its image's grids cover
        (``Adapter.grid_region``)."""
        x0, y0, x1, y1 = image_box
        f0, g0, f1, g1 = self.region
        return x0 + f0 * (x1 - x0), y0 + g0 * (y1 - y0), x0 + f1 * (x1 - x0), y0 + g1 * (y1 - y0)

    def frame_groups(self) -> list["ImageTokens"]:
        """One ImageTokens of grid (1, h, w) per frame group, each with its own features, attention block, keys,
        grey values and DeepStack rows (an image is its own single group). Vision pruners see a video this way."""
        t, h, w = self.grid
        if t == 1:
            return [self]
        per, pat = h * w, h * w * self.patches_per_token
        att, out = self.attention, []
        for g in range(t):
            tok, pp = slice(g * per, (g + 1) * per), slice(g * pat, (g + 1) * pat)
            out.append(ImageTokens(
                features=self.features[tok], grid=(1, h, w), patches_per_token=self.patches_per_token,
                attention=None if att is None else att[g] if att.dim() == 3 else att[pp, pp],
                cls_attention=None if self.cls_attention is None else self.cls_attention[tok],
                received=None if self.received is None else self.received[pp],
                given=None if self.given is None else self.given[pp],
                keys=None if self.keys is None else self.keys[tok],
                grey=None if self.grey is None else self.grey[tok], kind=self.kind,
                deepstack=None if self.deepstack is None else self.deepstack[:, tok], instruction=self.instruction))
        return out


@dataclass
class ModelInfo:
    """What a policy needs to know about a model to validate itself."""

    family: str
    num_layers: int
    num_vision_layers: int
    name: str = ""
    vision_attention_layers: tuple[int, ...] | None = None
    """the vision layers whose attention spans a whole image (None: all; Qwen2.5-VL: its full-attention blocks,
    the others attend within windows)"""
    cls_token: bool = False
    """does the vision tower have a [CLS] token (CLIP) whose attention methods can read"""
    resample_unsupported: str = ""
    """why the family's images cannot be resized for the tower (``downsample``), or "" when they can"""

    def check_vision_layer(self, method: str, layer: int | None, reads_attention: bool = True) -> None:
        """Refuse a vision layer outside the tower, or, for a method that reads the layer's attention, one whose
        attention never spans the image (a windowed block). ``None``: the adapter's default (always valid)."""
        n = self.num_vision_layers
        if layer is None:
            return
        if not -n <= layer < n:
            raise PolicyError(f"{method}.layer = {layer} is outside the vision tower, which has {n} layers "
                              f"(expected -{n} <= layer < {n})")
        full = self.vision_attention_layers
        if reads_attention and full is not None and layer % n not in full:
            raise PolicyError(f"{method}.layer = {layer}: that vision block of this {self.family} tower attends within "
                              f"windows, so its attention never spans the image; use a full-attention block "
                              f"({', '.join(map(str, full))}) or layer: null (the last of them)")


class Adapter(ABC):
    family: str = ""
    title: str = ""
    """the family's name for people (error messages)"""
    model_classes: tuple[str, ...] = ()
    supports_video: bool = False
    """does the family take ``videos=`` (its processor has a video processor, its model video placeholders)"""
    resample_unsupported: str = "vlmfast has no way to resize this family's images for its vision tower"
    """why :meth:`resampled_features` cannot serve this family, or "" when it can"""
    video_unsupported: str = ""
    """without ``supports_video``: why ``videos=`` is refused (default: the family has no video input)"""
    multi_view: bool = False
    """does the family make an image several views (``ImageTokens.view``: LLaVA-NeXT's base and high-res grids)"""

    def __init__(self, model: nn.Module):
        # a transformers model of the family: its submodules and config are the family's own (nn.Module's
        # __getattr__ would type each one as Tensor | Module)
        self.model: Any = model
        self.last_attention_s = 0.0  # time spent reading the vision layer's attention in the last call
        self.pixel_norm = ([0.0] * 3, [1.0] * 3)  # processor's (image_mean, image_std), set by prepare()
        self.video_norm = self.pixel_norm  # the video processor's, set by prepare()

    # -- structure -------------------------------------------------------------------------------------------
    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return cast(nn.ModuleList, self.language_model.layers)

    def info(self) -> ModelInfo:
        return ModelInfo(
            family=self.family, num_layers=len(self.decoder_layers), num_vision_layers=len(self.vision_layers),
            name=getattr(self.model, "name_or_path", "") or "", vision_attention_layers=self.vision_attention_layers,
            cls_token=self.tower_has_cls, resample_unsupported=self.resample_unsupported,
        )

    @property
    def tower_has_cls(self) -> bool:
        """Does the vision tower prepend a [CLS] token (LLaVA's CLIP; not SigLIP, not the Qwen towers)."""
        return False

    @property
    def vision_attention_layers(self) -> tuple[int, ...] | None:
        """The vision layers whose attention spans a whole image (None: all of them)."""
        return None

    @property
    @abstractmethod
    def vision_layers(self) -> nn.ModuleList: ...

    @abstractmethod
    def default_vision_layer(self) -> int:
        """Index of the vision layer whose output becomes the LLM's image features."""

    def resolve_vision_layer(self, layer: int | None) -> int:
        n = len(self.vision_layers)
        if layer is None:
            return self.default_vision_layer()
        return layer + n if layer < 0 else layer

    # -- inputs ----------------------------------------------------------------------------------------------
    def prompt_text(self, processor, prompt: str, n_images: int, n_videos: int = 0) -> str:
        """The model's chat format for one user turn with ``n_images`` images, then ``n_videos`` videos, followed
        by ``prompt``."""
        content = ([{"type": "image"} for _ in range(n_images)] + [{"type": "video"} for _ in range(n_videos)]
                   + [{"type": "text", "text": prompt}])
        conversation = [{"role": "user", "content": content}]
        if getattr(processor, "chat_template", None):
            text = processor.apply_chat_template(conversation, add_generation_prompt=True)
            video_token = getattr(processor, "video_token", None)
            if not n_videos or not video_token or text.count(video_token) >= n_videos:
                return text
            log.warning("vlmfast: the processor's chat template does not render video items (no %s in the prompt); "
                        "using the %s default format", video_token, self.title or self.family)
        return self.fallback_prompt(prompt, n_images, n_videos)

    def placeholders(self, processor) -> list[str]:
        """The strings of the processor's visual placeholder tokens (``<image>``, ``<|image_pad|>``, ...): vlmfast
        writes them into the prompt itself, one set per image or video passed, so a prompt must not contain them."""
        found = [getattr(processor, a, None) for a in ("image_token", "video_token")]
        return [s for s in found if isinstance(s, str) and s]

    @abstractmethod
    def fallback_prompt(self, prompt: str, n_images: int, n_videos: int = 0) -> str: ...

    def prepare(self, processor, images: list[list[Any]], prompts: list[str],
                videos: list[list[Any]] | None = None) -> dict[str, torch.Tensor]:
        """Tokenise a batch (left padding) with the model's own processor. ``videos``: per sample, its videos
        ((T, H, W, 3) uint8 arrays), placed after the sample's images (families with ``supports_video``)."""
        videos = videos or [[] for _ in prompts]
        texts = [self.prompt_text(processor, p, len(imgs), len(vids)) for p, imgs, vids in zip(prompts, images, videos)]
        flat_videos = [v for vids in videos for v in vids]
        kwargs = {"videos": flat_videos} if flat_videos else {}
        tok = processor.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = processor(images=self.processor_images(images), text=texts, padding=True, return_tensors="pt",
                            **kwargs)
        finally:
            tok.padding_side = side
        self.pixel_norm = _norm(getattr(processor, "image_processor", None))
        self.video_norm = _norm(getattr(processor, "video_processor", None)) if flat_videos else self.pixel_norm
        device = self.model.device
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in enc.items()}

    def processor_images(self, images: list[list[Any]]) -> list | None:
        """What the processor's ``images=`` gets for a batch (per sample, its images): one flat list, or None when
        there are none."""
        return [im for imgs in images for im in imgs] or None

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def image_token_mask(self, inputs) -> torch.Tensor:
        """True at every visual placeholder of the sequence (image tokens, and video tokens where the family has
        them): the tokens vision features are scattered into and pruners choose from."""
        return inputs["input_ids"] == self.image_token_id

    def fixed_token_mask(self, inputs) -> torch.Tensor | None:
        """(B, L) True at placeholders that receive an input's ``ImageTokens.fixed`` features (never pruned; not in
        ``image_token_mask``), or None when the family has none."""
        return None

    def grid_region(self, processor, size: tuple[int, int]) -> tuple[float, float, float, float]:
        """The box (x0, y0, x1, y1), in pixels of the original image of ``size`` (W, H), that an image's token
        grid covers once the processor has laid it out (it may extend past the image when the processor pads).
        Default: the whole image (the Qwen processors resize the whole image to its grid)."""
        return 0.0, 0.0, float(size[0]), float(size[1])

    # -- vision ----------------------------------------------------------------------------------------------
    @abstractmethod
    def image_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        """Run the vision tower once; return each image's features (and the chosen layer's attention; and the
        pixels' grey values under each token when ``grey``). ``means_only``: the methods need only the attention's
        column and row means (``ImageTokens.received`` / ``given``); an adapter may then skip the (N, N) matrix."""

    def video_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                     means_only: bool = False) -> list[ImageTokens]:
        """Like ``image_tokens`` for the request's videos (grid t = frame groups); none for image-only families."""
        return []

    def visual_tokens(self, inputs, attention_layer: int | None, grey: bool = False,
                      means_only: bool = False) -> tuple[list[ImageTokens], list[ImageTokens]]:
        """(images, videos), each in request order; ``last_attention_s`` is the attention-reading time of both."""
        self.last_attention_s = 0.0
        images = self.image_tokens(inputs, attention_layer, grey, means_only)
        spent, self.last_attention_s = self.last_attention_s, 0.0
        videos = self.video_tokens(inputs, attention_layer, grey, means_only) if self.supports_video else []
        self.last_attention_s += spent
        return images, videos

    def resampled_features(self, inputs, index: int, grid: tuple[int, int]) -> torch.Tensor:
        """(h * w, d_model): the features the language model would receive for image ``index`` (in the order of
        ``image_tokens``) if the tower's input were that image resized to an ``grid`` = (h, w) grid of LLM tokens:
        its preprocessed pixels resized (bicubic, antialiased) and run through the tower and projector again. Only
        where ``resample_unsupported`` is ""."""
        raise PolicyError(f"{self.title or self.family}: {self.resample_unsupported}")

    @contextmanager
    def capture_inputs(self, module: nn.Module) -> Iterator[dict]:
        """Record the keyword inputs (hidden_states and friends) of one call to ``module``."""
        seen: dict = {}

        def hook(mod, args, kwargs):
            seen.update(kwargs)
            if args:
                seen["hidden_states"] = args[0]
            for i, a in enumerate(args[1:], 1):
                seen[f"arg{i}"] = a

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()

    @contextmanager
    def capture_outputs(self, **modules: nn.Module) -> Iterator[dict]:
        """Record, by name, the output of one call to each module: e.g. the q / k projections the vision tower
        computes anyway, so scoring does not compute them a second time."""
        seen: dict = {}
        handles = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(name, out))
                   for name, m in modules.items()]
        try:
            yield seen
        finally:
            for h in handles:
                h.remove()

    # -- positions -------------------------------------------------------------------------------------------
    @abstractmethod
    def positions(self, inputs) -> torch.Tensor:
        """Position ids of the full (unpruned) sequence, shape (R, B, L); row 0 is the 1-D text position."""

    @abstractmethod
    def model_position_ids(self, positions: torch.Tensor) -> torch.Tensor:
        """Turn (R, B, L) positions into what the model's forward takes as ``position_ids``."""

    def set_decode_state(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Store whatever the model keeps between steps (the Qwen families' ``rope_deltas``). An optional hook: the
        default stores nothing."""
        return None

    @contextmanager
    def preserved_state(self) -> Iterator[None]:
        """Restore per-request model state (e.g. ``rope_deltas``) after a call."""
        yield

    # -- prefill ---------------------------------------------------------------------------------------------
    @contextmanager
    def prefill_hooks(self, deepstack: torch.Tensor | None, image_mask: torch.Tensor,
                      columns: Callable[[int], tuple[torch.Tensor, torch.Tensor] | None] | None = None
                      ) -> Iterator[None]:
        """Around one prefill forward: whatever the family's own forward does to the decoder's hidden states that
        vlmfast's ``inputs_embeds`` call skips (Qwen3-VL's DeepStack injection). ``deepstack``: (levels, V, d), one
        row per True of ``image_mask`` (B, L), row-major; ``columns(layer)``: the prefill columns that layer's output
        holds when a layer pruner shortened the sequence ((B, L') indices into the prefill sequence, their
        validity), None for all. Default: nothing to do."""
        yield


def _norm(processor) -> tuple[list[float], list[float]]:
    """A (sub-)processor's (mean, std), identity when it has none."""
    return getattr(processor, "image_mean", None) or [0.0] * 3, getattr(processor, "image_std", None) or [1.0] * 3


def unnormalise_grey(pixels: torch.Tensor, norm, channel_dim: int) -> torch.Tensor:
    """Processor-normalised pixels -> grey values in [0, 255] (equal-weight channel mean)."""
    shape = [1] * pixels.dim()
    shape[channel_dim] = -1
    mean = torch.tensor(norm[0], dtype=torch.float32, device=pixels.device).view(shape)
    std = torch.tensor(norm[1], dtype=torch.float32, device=pixels.device).view(shape)
    return ((pixels.float() * std + mean) * 255).clamp(0, 255).mean(channel_dim)


def text_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """1-D positions from a left-padded mask, as ``generate`` builds them (pads get 0)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


def head_mean_attention(q: torch.Tensor, k: torch.Tensor, scaling: float,
                        chunk_elements: int = 2**21) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scaling) averaged over heads, (N, N), computed in query chunks of about ``chunk_elements``
    logits (so the temporaries stay cache-sized whatever the head count and length); and the head-mean keys
    (N, d). q, k: (H, N, d). q is scaled once, k transposed once (contiguous)."""
    h, n = q.shape[0], k.shape[1]
    out = torch.empty(q.shape[1], n, dtype=torch.float32, device=q.device)
    qs = (q.float() * scaling).contiguous()
    kt = k.float().transpose(-1, -2).contiguous()
    rows = max(1, chunk_elements // max(1, h * n))
    for s in range(0, q.shape[1], rows):
        out[s : s + rows] = torch.matmul(qs[:, s : s + rows], kt).softmax(-1).mean(0)
    return out, k.float().mean(0)


def head_mean_attention_means(q: torch.Tensor, k: torch.Tensor, scaling: float,
                              chunk_elements: int = 2**21) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The column and row means of :func:`head_mean_attention`'s (N, N) matrix, (N,) each, and the head-mean keys,
    without building the matrix: the same query chunks, reduced as they go (memory O(N) instead of O(N^2))."""
    h, n = q.shape[0], k.shape[1]
    col = torch.zeros(n, dtype=torch.float32, device=q.device)
    row = torch.empty(q.shape[1], dtype=torch.float32, device=q.device)
    qs = (q.float() * scaling).contiguous()
    kt = k.float().transpose(-1, -2).contiguous()
    rows = max(1, chunk_elements // max(1, h * n))
    for s in range(0, q.shape[1], rows):
        p = torch.matmul(qs[:, s : s + rows], kt).softmax(-1).sum(0)  # (rows, N), summed over heads
        col += p.sum(0)
        row[s : s + rows] = p.sum(1)
    return col / (h * q.shape[1]), row / (h * n), k.float().mean(0)


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., C, H, W) processor-normalised pixels resized to ``size`` (bicubic, antialiased: what the processors'
    PIL resize does; interpolation commutes with their per-channel normalisation); unchanged at their own size."""
    if tuple(pixels.shape[-2:]) == tuple(size):
        return pixels
    lead = pixels.shape[:-3]
    flat = pixels.reshape(-1, *pixels.shape[-3:]).float()
    out = torch.nn.functional.interpolate(flat, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out.reshape(*lead, *out.shape[-3:]).to(pixels.dtype)
