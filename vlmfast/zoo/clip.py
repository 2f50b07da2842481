"""``tiny-clip-shapes``: open_clip's own ``CLIP`` at a tiny size, trained on ShapesWorld, and the image-prompt
matcher AGLA uses (a global image-text similarity plus a dense patch-text similarity map).

The model is a plain :class:`open_clip.CLIP` (``VisionTransformer`` + ``TextTransformer``); only the sizes, a
word-level tokenizer over ShapesWorld's closed vocabulary and average pooling of the patch tokens differ from
the published configs. Trained by ``python -m training.train_clip`` (see the model card next to the weights).

>>> from vlmfast.zoo.clip import load_clip
>>> matcher = load_clip("tiny-clip-shapes")                          # doctest: +SKIP
>>> sims, maps = matcher.match([scene.image], ["red circle"])       # doctest: +SKIP  (B,), (B, g, g)

Dense maps (spec §1.10 option C, gradient-free): with average pooling (``pool_type="avg"``, this model) the
image embedding is the mean of the patch tokens after ``ln_post`` and ``proj``, so each patch token projected the
same way lives in the text embedding space by construction and its cosine with the text embedding is the map.
With [CLS] pooling (``pool_type="tok"``, the published CLIPs) the last block's query-key attention is replaced
by value-value attention (no residual, no MLP), as the CLIP-Surgery / SCLIP line of work does, and the tokens
go through ``ln_post`` and ``proj``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

WEIGHTS_DIR = Path(__file__).parent / "weights" / "tiny-clip-shapes"
NAMES = ("tiny-clip-shapes",)
"""Zoo names :func:`load_clip` accepts."""
SPECIALS = ("<pad>", "<sot>", "<eot>", "<unk>")
PAD, SOT, EOT, UNK = range(4)


@dataclass(frozen=True)
class TinyClipConfig:
    """Sizes of a tiny CLIP (ViT-B/32 uses 224 px, patch 32, width 768, 12 layers; text width 512, 12 layers)."""

    image_size: int = 96
    patch_size: int = 12
    vision_width: int = 128
    vision_layers: int = 4
    vision_head_width: int = 32
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    context_length: int = 24
    embed_dim: int = 128
    pool_type: str = "avg"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    vocab: tuple[str, ...] = SPECIALS
    """the tokenizer's words, the specials first (every other word maps to ``<unk>``); the trainer
    (``training/train_clip.py``) uses ShapesWorld's closed vocabulary, and the saved config carries it"""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "TinyClipConfig":
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown tiny-clip config keys {sorted(unknown)}; expected some of {sorted(names)}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**kw)

    def open_clip_kwargs(self) -> dict:
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": {"image_size": self.image_size, "patch_size": self.patch_size, "width": self.vision_width,
                           "layers": self.vision_layers, "head_width": self.vision_head_width,
                           "pool_type": self.pool_type},
            "text_cfg": {"context_length": self.context_length, "vocab_size": len(self.vocab),
                         "width": self.text_width, "heads": self.text_heads, "layers": self.text_layers,
                         "pad_id": PAD, "eos_id": EOT, "pool_type": "eos"},
        }


class WordTokenizer:
    """Word-level tokenizer: ``<sot> words... <eot> <pad>...``; unknown words map to ``<unk>``; punctuation
    is split off; lowercased. Texts longer than the context are truncated (``<eot>`` is always kept)."""

    def __init__(self, vocab: Sequence[str], context_length: int):
        self.vocab = list(vocab)
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.context_length = context_length

    def words(self, text: str) -> list[str]:
        for p in ",.?!;:":
            text = text.replace(p, f" {p} ")
        return text.lower().split()

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), self.context_length), PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [SOT] + [self.index.get(w, UNK) for w in self.words(t)][: self.context_length - 2] + [EOT]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def preprocess(images: Sequence, size: int, mean, std) -> torch.Tensor:
    """PIL images (any size) -> (B, 3, size, size) float pixels: bicubic resize (aspect ratio ignored), /255,
    normalised with ``mean``/``std``. Training and matching use this same function."""
    from PIL import Image

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)) for im in images])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.as_tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x - mean) / std


def build_tiny_clip(cfg: TinyClipConfig | None = None):
    """A randomly initialised :class:`open_clip.CLIP` of ``cfg``'s sizes."""
    import open_clip

    cfg = cfg or TinyClipConfig()
    return open_clip.CLIP(**cfg.open_clip_kwargs())


class ClipMatcher:
    """Image-prompt matching with an open_clip model: global cosine similarity and dense patch-text maps.

    ``tokenizer(texts) -> (B, T) ids``; ``mean``/``std``: pixel normalisation; images are resized (bicubic,
    ignoring the aspect ratio) to the model's input size.
    """

    def __init__(self, model, tokenizer, image_size: int, mean, std, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.name = name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def preprocess(self, images: Sequence) -> torch.Tensor:
        """PIL images (any size) -> (B, 3, S, S) normalised pixels."""
        return preprocess(images, self.image_size, self.mean, self.std).to(self.device)

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, E) L2-normalised text embeddings."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens), dim=-1)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, E) L2-normalised image embeddings."""
        return torch.nn.functional.normalize(self.model.encode_image(pixels), dim=-1)

    def patch_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, g*g, E) patch tokens projected into the joint embedding space (not normalised)."""
        visual = self.model.visual
        if getattr(visual, "attn_pool", None) is not None or not hasattr(visual, "transformer"):
            raise NotImplementedError("dense maps need an open_clip VisionTransformer without attentional pooling")
        x = visual._embeds(pixels)
        blocks = visual.transformer.resblocks
        for blk in blocks[:-1]:
            x = blk(x)
        if visual.pool_type == "avg" and not visual.final_ln_after_pool:
            x = blocks[-1](x)
            tokens = visual.ln_post(x)[:, 1:]
        elif visual.pool_type == "tok":
            tokens = visual.ln_post(_value_value_attention(blocks[-1], x))[:, 1:]
        else:
            raise NotImplementedError(f"dense maps for pool_type={visual.pool_type!r} "
                                      f"(final_ln_after_pool={visual.final_ln_after_pool}) are not implemented")
        return tokens @ visual.proj

    def match(self, images: Sequence, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (image, text) pair: the global cosine similarity (B,) and the dense cosine map (B, g, g)."""
        if len(images) != len(texts):
            raise ValueError(f"match() pairs images and texts: got {len(images)} images and {len(texts)} texts")
        with torch.inference_mode():
            pixels = self.preprocess(images)
            text = self.encode_text(texts)
            sims = (self.encode_image(pixels) * text).sum(-1)
            patches = torch.nn.functional.normalize(self.patch_embeddings(pixels), dim=-1)
            dense = torch.einsum("bne,be->bn", patches, text)
        g = int(round(dense.shape[1] ** 0.5))
        return sims.float().cpu(), dense.view(-1, g, g).float().cpu()


def _value_value_attention(block, x: torch.Tensor) -> torch.Tensor:
    """The last block with its query-key attention replaced by value-value attention, without the residual
    and the MLP (x: (B, N, D), batch first). Only open_clip's default block (``nn.MultiheadAttention``)."""
    attn = getattr(block, "attn", None)
    if not isinstance(attn, torch.nn.MultiheadAttention) or attn.in_proj_weight is None:
        raise NotImplementedError(f"value-value attention needs open_clip's default block, got {type(block).__name__}")
    d = attn.embed_dim
    h = attn.num_heads
    y = block.ln_1(x)
    v = torch.nn.functional.linear(y, attn.in_proj_weight[2 * d:], attn.in_proj_bias[2 * d:] if attn.in_proj_bias
                                   is not None else None)
    b, n, _ = v.shape
    v = v.view(b, n, h, d // h).transpose(1, 2)  # (B, H, N, dh)
    w = torch.softmax(v @ v.transpose(-1, -2) * (d // h) ** -0.5, dim=-1)
    out = (w @ v).transpose(1, 2).reshape(b, n, d)
    return attn.out_proj(out)


def save_tiny_clip(model, cfg: TinyClipConfig, folder: str | Path, dtype=torch.float16) -> None:
    """``model.safetensors`` (``dtype``; fp16 keeps the committed file small) + ``config.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_tiny_clip(folder: str | Path = WEIGHTS_DIR, device: str | torch.device = "cpu"):
    """(model, cfg) from a folder written by :func:`save_tiny_clip`; weights are cast to float32."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg = TinyClipConfig.from_dict(json.loads((folder / "config.json").read_text()))
    model = build_tiny_clip(cfg)
    state = {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}
    model.load_state_dict(state)
    return model.to(device).eval(), cfg


def load_clip(name_or_folder: str = "tiny-clip-shapes", device: str | torch.device = "cpu") -> ClipMatcher:
    """A :class:`ClipMatcher` for a zoo name (``tiny-clip-shapes``) or a folder in the same format."""
    from ..errors import InputError
    from . import resolve

    folder = Path(resolve(name_or_folder))
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise InputError(f"{name_or_folder!r} is not a tiny-clip folder (config.json + model.safetensors) nor one of "
                         f"the zoo names {list(NAMES)}")
    model, cfg = load_tiny_clip(folder, device)
    return ClipMatcher(model, WordTokenizer(cfg.vocab, cfg.context_length), cfg.image_size, cfg.mean, cfg.std,
                       name=str(name_or_folder))
