"""Qwen3-VL (``Qwen3VLForConditionalGeneration``, and the MoE ``Qwen3VLMoeForConditionalGeneration``, which shares its
vision path): Qwen2-VL's layout (no CLS token, 2x2 patch merger, M-RoPE, video) with three differences.

* **DeepStack.** The tower's outputs at ``deepstack_visual_indexes`` (8B: blocks 8, 16, 24), each through its own
  merger, are added to the hidden states that leave decoder layers 0, 1, ... at the visual positions. vlmfast
  prefills with ``inputs_embeds`` (the pruned sequence), which skips the model's own injection, so the adapter adds
  the levels itself with forward hooks on those decoder layers, removed after the prefill. The levels are rows of
  :class:`ImageTokens` (``deepstack``), so a vision pruner drops the same tokens from every level; a layer pruner
  (FastV, ...) that shortens the sequence before a DeepStack layer gets the levels of the tokens it kept.
  Pruners that merge the dropped tokens into kept ones (VisionZip's contextual tokens) merge the main features only:
  a kept token's DeepStack rows are its own.
* **Interleaved M-RoPE.** The model interleaves the (t, h, w) frequencies itself; the positions vlmfast keeps are the
  same (3, B, L) rows ``get_rope_index`` gives.
* **Video time is text.** The processor writes each frame group's timestamp into the prompt (``<0.5 seconds>``)
  before its own span of ``<|video_pad|>`` tokens, so one video is several spans in the sequence, and temporal
  positions advance per span, not by ``second_per_grid_ts``. Timestamps come from the processor's frame rate
  (transformers assumes 24 fps for frames passed as arrays).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Sequence

import torch

from .base import Adapter
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    title = "Qwen3-VL"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")
    resample_unsupported = ("its DeepStack levels would have to come from the resized image too, and a vision "
                            "pruner's result carries the main features only; downsample supports LLaVA-1.5, Qwen2-VL "
                            "and Qwen2.5-VL")
    resampled_features = Adapter.resampled_features  # refuses, naming the reason above

    def deepstack(self, tower) -> Sequence[torch.Tensor | None]:
        levels = tower.deepstack_features or []  # per level, a tuple with one tensor per image / video
        if not levels:
            return [None] * len(tower.pooler_output)
        return [torch.stack(per_input) for per_input in zip(*levels)]

    @contextmanager
    def prefill_hooks(self, deepstack, image_mask, columns=None):
        if deepstack is None or deepstack.shape[0] == 0:
            yield
            return
        # rank[b, l]: the row of deepstack that visual token (b, l) owns (row-major over the visual tokens)
        rank = (image_mask.reshape(-1).long().cumsum(0) - 1).view(image_mask.shape)

        def inject(level: int):
            def hook(module, args, output):
                hidden = output[0] if isinstance(output, tuple) else output
                held = columns(level) if columns is not None else None
                if held is None:
                    visual, rows = image_mask, rank[image_mask]
                else:  # a layer pruner shortened the sequence: the visual tokens among the columns still held
                    keep, valid = held
                    visual = image_mask.gather(1, keep) & valid
                    rows = rank.gather(1, keep)[visual]
                hidden = hidden.clone()
                hidden[visual] = hidden[visual] + deepstack[level, rows].to(hidden.device, hidden.dtype)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            return hook

        layers = self.decoder_layers
        handles = [layers[i].register_forward_hook(inject(i)) for i in range(min(deepstack.shape[0], len(layers)))]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
