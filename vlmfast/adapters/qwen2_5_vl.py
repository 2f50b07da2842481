"""Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): Qwen2-VL's layout (no CLS token, 2x2 patch merger, 3-D
M-RoPE positions, video) with a windowed vision tower and absolute time in video positions.

* The tower reorders the patches into windows (``window_size`` pixels square, in merged-token units) before its
  first block and back after the merger; every block attends within a window except ``fullatt_block_indexes``,
  which attend over the whole image (a video: its frame group). Scoring pruners read a full-attention block (the
  last one by default; Qwen2.5-VL-7B: block 31 of 32), whose attention is mapped back to image (raster) order here.
  A policy naming a windowed block for a pruner that reads attention is refused (``ModelInfo``'s
  ``vision_attention_layers``): its attention never leaves a window.
* Video positions carry absolute time (``second_per_grid_ts`` from the processor, read by ``get_rope_index``), so a
  kept video token keeps the temporal position of its frame group's timestamp.
"""

from __future__ import annotations

import inspect

import torch

from .qwen2_vl import Qwen2VLAdapter


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    model_classes = ("Qwen2_5_VLForConditionalGeneration",)

    @property
    def full_attention_layers(self) -> list[int]:
        """The vision blocks that attend over a whole image (the others attend within windows)."""
        return sorted(int(i) for i in self.model.model.visual.fullatt_block_indexes)

    @property
    def vision_attention_layers(self) -> tuple[int, ...]:
        return tuple(self.full_attention_layers)

    def resolve_vision_layer(self, layer: int | None) -> int:
        """``None``: the last full-attention block (the merger reads the last block, which is one of them in every
        released checkpoint; if it were windowed, scoring would still read whole-image attention)."""
        if layer is None:
            return self.full_attention_layers[-1]
        return super().resolve_vision_layer(layer)

    def tower_order(self, grid_thw) -> torch.Tensor:
        """Patch order inside the tower's blocks: the window order the tower computes (merged-token units), each
        unit's ``merge**2`` patches kept together."""
        visual = self.model.model.visual
        if hasattr(visual, "get_window_index"):  # the tower's own method (older transformers)
            window_index, _ = visual.get_window_index(grid_thw)
        else:  # the function the tower's module calls
            fn = inspect.getmodule(type(visual)).get_vision_window_index  # type: ignore[union-attr]
            window_index, _ = fn(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                 window_size=visual.window_size, patch_size=visual.patch_size)
        unit = self.merge * self.merge
        window_index = window_index.to(grid_thw.device)
        return (window_index[:, None] * unit + torch.arange(unit, device=grid_thw.device)).reshape(-1)

    def rope_inputs(self, inputs) -> dict:
        """Videos: seconds per frame group, so temporal positions follow absolute time."""
        ts = inputs.get("second_per_grid_ts")
        return {} if ts is None else {"second_per_grid_ts": ts}
