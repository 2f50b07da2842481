"""``GroundingConfig``: the hyper-parameters of attention-as-prompt grounding (a policy's ``grounding:`` section).

    grounding:
      sam_type: tiny-sam-shapes        # or vit_b / vit_l / vit_h (segment-anything), vit_t (MobileSAM)
      sam_checkpoint: null             # a .pth / .pt / .safetensors path (required for vit_*)
      head_weights: mean               # VL-SAM's: mean-max
      flow: none                       # VL-SAM's: regularised

The map defaults (plain head mean, the layers' direct attention averaged, phrase and answer rows) are the
variant that pointed best on the embedded models' dev split; VL-SAM's head weights and regularised flow are
implemented as options and measured beside them (docs/methods/grounding.md). Validated like a method
dataclass (pydantic, unknown fields rejected). Spec:
shared/reference/hallucination_grounding.md sections 4-5; docs/methods/grounding.md.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from ..method import method_dataclass

SAM_TYPES = ("tiny-sam-shapes", "vit_b", "vit_l", "vit_h", "vit_t")


@method_dataclass
class GroundingConfig:
    sam_type: Literal["tiny-sam-shapes", "vit_b", "vit_l", "vit_h", "vit_t"] = "tiny-sam-shapes"
    """tiny-sam-shapes (the embedded default); vit_b / vit_l / vit_h (segment-anything's SAM); vit_t (MobileSAM,
    needs the ``mobile_sam`` package)"""
    sam_checkpoint: str | None = None
    """weights file (.pth / .pt loaded with ``torch.load(weights_only=True)``, or .safetensors); required for
    vit_*; for tiny-sam-shapes a tiny-sam folder or .safetensors (default: the committed weights)"""
    head_weights: Literal["mean-max", "image-mean-max", "mean"] = "mean"
    """mean-max: each head weighted by the mean over queries of its max attention (VL-SAM); image-mean-max: the
    same over text queries and image keys only (a head that pours its attention into the BOS sink gets no
    weight); mean: plain mean"""
    flow: Literal["regularised", "rollout", "none"] = "none"
    """propagation across layers: VL-SAM's regularised attention flow (columns damped by
    1 - (L0 - 1) / L), plain rollout v <- v (I + A), or none (the layers' direct attention averaged)"""
    layers: list[int] | None = None
    """decoder layers whose attention makes the map (negative counts from the end; None: all). Which layers
    ground best is a property of the model: measure it with ``python -m vlmfast.eval.grounding_ablation``"""
    remove_sinks: bool = True
    """zero visual attention sinks (image tokens whose residual stream shows massive activations) in the map"""
    sink_tau: Annotated[float, Field(gt=1)] = 20.0
    """sink threshold on ``max_d |x_d| / rms(x)`` (VAR's tau = 20; ordinary tokens sit near 3-6)"""
    sink_from_layer: Annotated[int, Field(ge=0)] = 2
    """sinks are detected at the inputs of layers >= this one (VAR: 2)"""
    prompt_rows: Literal["phrase", "answer", "phrase+answer", "reply", "phrase+reply"] = "phrase+answer"
    """for a ``ground_phrases`` phrase, which query rows make its map: the phrase's own tokens, the position
    that predicts the answer (the last prompt token, which has read the whole question), both, every row that
    chose a token of the reply (that position and each decode step), or the phrase's tokens and those"""
    answer_objects: bool = True
    """also ground the object words of the generated answer (the rows that chose those words)"""
    object_words: list[str] | None = None
    """object nouns to ground in answers (default: ShapesWorld's shapes and the 80 COCO categories)"""
    threshold: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """positive region: map >= threshold * max, largest connected component by attention mass"""
    positive_point: Literal["centroid", "peak"] = "centroid"
    """where in the positive region the positive point goes: its heat-weighted centre of mass (default: chosen on
    the dev split, where it moved mIoU from 0.613 to 0.640), or the map's peak there (VL-SAM's choice; the peak
    of a bicubically upsampled token map often sits at an object's edge or between two objects)"""
    negative_point: bool = True
    """add one negative point at the map's lowest point (farthest from the positive one)"""
    use_box: bool = False
    """also prompt SAM with the positive region's bounding box"""
    multimask: bool = False
    """first SAM call with 3 candidate masks (best by predicted IoU) instead of SAM's single-mask output"""
    overlap: bool = False
    """encode the images for SAM in a background thread (one per request, ended when it is done) while the VLM
    prefills and decodes. Off by default: on CPU the second thread's intra-op threads compete with the VLM's (with
    more threads than cores, OpenMP stops spinning and every parallel region pays a wake-up), so the overlapped
    call took longer than encoding after decoding (58 vs 37 ms for a referring question on the 2-core machine);
    use it where a core is free"""
    refine: Annotated[int, Field(ge=0, le=5)] = 0
    """refinement rounds (VL-SAM's iterative refinement): add points where the mask and the map disagree and ask
    SAM again, with its previous logits as ``mask_input`` when mask feedback is on; stops when nothing is added.
    0 by default: with tiny-sam-shapes (no mask feedback) it did not help on the dev split and costs a SAM call;
    use 1 with a real SAM checkpoint"""
    mask_feedback: Literal["auto", "on", "off"] = "auto"
    """refinement rounds also feed SAM its previous low-res logits (``mask_input``, VL-SAM's cascade). auto: on,
    except for tiny-sam-shapes, which was trained with point and box prompts only (mask prompts degrade it)"""
