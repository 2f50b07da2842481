"""``vlmfast bench sparse``: sparse prefill attention, measured side by side in one process.

Three parts, one JSON (``--json PATH``):

* **kernel** (8k / 16k / 32k tokens): a video-like layout (64 text tokens, frames of 14 x 14 tokens as
  Qwen2-VL gives them for 392 px frames, a 64-token question), ``heads`` query heads of ``head_dim`` with
  one MMInference pattern each (grid on the frame stride, grid on the row stride, A-shape, vertical-slash,
  with the research code's budgets) on synthetic queries/keys that carry those structures (sink, RoPE-local,
  grid lines, temporal slashes). Rows: dense causal SDPA, FlexAttention (compiled) with the same masks, and
  vlmfast's kernel (online estimation included); time (median of interleaved repeats), speedup over SDPA,
  density (kept share of the causal pairs), ideal speedup (1 / density) and recall (softmax mass kept).
* **end_to_end**: prefill (vision tower + language model to the first logits) of a random-weight proxy with
  Qwen2-VL's layout (``Qwen2VLForConditionalGeneration``, M-RoPE, GQA, 2x2 merger, video frames through the
  processor) on a video of >= 16k tokens through the public path, ``VLMAccelerator.generate(videos=...)``,
  dense vs. ``mminference``, with the attention share of the proxy's prefill FLOPs and the ideal speedup it
  allows (Amdahl), and the same share for Qwen2-VL-7B.
* **recall**: per layer, the attention recall and density of the shipped head patterns of the embedded
  ``tiny-llava-shapes`` on multi-image ShapesWorld prompts (>= 8 images each, scenes the search never saw).

Speed is a ratio measured in this run (the machine is shared and noisy): every configuration runs once per
round, rounds are repeated, times are medians and speed-ups the median of the per-round ratios; absolute
times are reported, never asserted.
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..search.heads import recall_and_density
from ..sparse.layout import Layout, Span, video_like
from ..sparse.mask import MaskSpec
from ..sparse.patterns import AShape, Grid, HeadContext, VerticalSlash

HEAD_KINDS = ("grid_frame", "grid_row", "a_shape", "vertical_slash")


def head_patterns(n_heads: int) -> list:
    """The pattern of each benchmark head (cycling through the four kinds), MMInference's budgets."""
    menu = {"grid_frame": Grid(stride="frame", local=1024),
            "grid_row": Grid(stride="row", local=1024, horizontal=False),
            "a_shape": AShape(sink=128, local=4096), "vertical_slash": VerticalSlash(vertical=1000, slash=1024)}
    return [menu[HEAD_KINDS[h % len(HEAD_KINDS)]] for h in range(n_heads)]


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    n, d = x.shape
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = ang.cos().float(), ang.sin().float()
    x1, x2 = x[:, 0::2], x[:, 1::2]
    out = torch.empty_like(x)
    out[:, 0::2] = x1 * cos - x2 * sin
    out[:, 1::2] = x1 * sin + x2 * cos
    return out


def synthetic_qkv(layout: Layout, kinds: list[str], d: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Queries, keys, values (H, n, d) whose attention has each head's planted structure: every head has an
    attention sink (first 4 tokens) and RoPE locality; ``grid_*`` heads add key columns at one phase of the
    frame / row stride; ``vertical_slash`` heads add a few strong columns and temporal correspondence (the same
    spatial cell in other frames: slashes at multiples of the frame stride)."""
    g = torch.Generator().manual_seed(seed)
    n = layout.n
    offsets = layout.offsets()
    frame = layout.strides("frame")
    row = layout.strides("row")
    scale = math.sqrt(d)

    def unit():
        v = torch.randn(d, generator=g)
        return v / v.norm()

    def amp(logit):  # a component whose query . key equals ``logit`` after the 1/sqrt(d) scaling
        return math.sqrt(logit * scale)

    qs, ks = [], []
    for kind in kinds:
        q = torch.randn(n, d, generator=g) * 0.3
        k = torch.randn(n, d, generator=g) * 0.3
        loc = unit() * amp(7.0)
        q += _rope(loc.expand(n, d).clone())
        k += _rope(loc.expand(n, d).clone())
        e_sink = unit()
        q += e_sink * amp(9.0)
        k[:4] += e_sink * amp(9.0)
        if kind.startswith("grid"):
            stride = frame if kind == "grid_frame" else row
            on = (offsets >= 0) & (offsets % stride.clamp(min=1) == 7 % stride.clamp(min=1))
            e = unit()
            q += e * amp(7.0)
            k[on] += e * amp(7.0)
        if kind == "vertical_slash":
            cols = torch.randperm(n, generator=g)[: max(1, n // 200)]
            e = unit()
            q += e * amp(7.0)
            k[cols] += e * amp(7.0)
            spatial = torch.randn(int(frame.max()) + 1, d, generator=g)
            spatial = spatial / spatial.norm(dim=1, keepdim=True) * amp(6.0)
            vis = offsets >= 0
            cell = offsets[vis] % frame[vis]
            q[vis] += spatial[cell]
            k[vis] += spatial[cell]
        qs.append(q)
        ks.append(k)
    v = torch.randn(len(kinds), n, d, generator=g)
    return torch.stack(qs), torch.stack(ks), v


def video_layout(seq_len: int, h: int = 14, w: int = 14, prefix: int = 64, suffix: int = 64) -> Layout:
    frames = max(1, (seq_len - prefix - suffix) // (h * w))
    return video_like(prefix, frames, h, w, seq_len - prefix - suffix - frames * h * w + suffix)


def build_specs(q, k, layout, patterns, block, scale) -> list[MaskSpec]:
    cache: dict = {}
    return [p.build(HeadContext(q[h], k[h], layout, block, scale, cache)) for h, p in enumerate(patterns)]


def _round_times(fns: dict, repeats: int, own_time: bool = False) -> dict[str, list[float]]:
    """``own_time``: each function returns its own time (e.g. a stage read from its stats) instead of being timed."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):  # interleaved: every configuration once per round
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(out if own_time else time.perf_counter() - t0)
    return times


def _median_times(fns: dict, repeats: int) -> dict:
    return {name: statistics.median(t) for name, t in _round_times(fns, repeats).items()}


def paired_speedup(times: dict[str, list[float]], base: str, name: str) -> float:
    """Median over rounds of base time / this time, each ratio taken within one round (the load of this
    shared machine drifts between rounds; a ratio inside a round is what both configurations saw)."""
    return statistics.median(b / t for b, t in zip(times[base], times[name]))


def kernel_rows(seq_lens=(8192, 16384, 32768), heads: int = 4, head_dim: int = 64, block: int = 128,
                repeats: int = 3, flex: bool = True, dtype=torch.float32, log=print) -> list[dict]:
    from ..sparse.kernels import flex as flex_mod
    from ..sparse.kernels.torch_kernel import sparse_attention

    rows = []
    for n in seq_lens:
        layout = video_layout(n)
        pats = head_patterns(heads)
        q, k, v = synthetic_qkv(layout, [HEAD_KINDS[h % 4] for h in range(heads)], head_dim)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        scale = head_dim ** -0.5
        t0 = time.perf_counter()
        specs = build_specs(q, k, layout, pats, block, scale)
        estimate_s = time.perf_counter() - t0
        fns = {
            "sdpa": lambda: F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=True, scale=scale),
            "vlmfast": lambda: sparse_attention(q, k, v, build_specs(q, k, layout, pats, block, scale), scale),
        }
        flex_compile_s = flex_mask_s = None
        if flex:
            t0 = time.perf_counter()
            bm = flex_mod.block_mask(specs)
            flex_mask_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = flex_mod.sparse_attention(q, k, v, specs, scale, mask=bm)  # compiles
            flex_compile_s = time.perf_counter() - t0
            fns["flex"] = lambda: flex_mod.sparse_attention(q, k, v, specs, scale, mask=bm)
        else:
            ref = None
        out = sparse_attention(q, k, v, specs, scale)  # warm-up + agreement check
        agree = None if ref is None else float((out.float() - ref.float()).abs().max())
        fns["sdpa"]()
        rounds = _round_times(fns, repeats)
        med = {name: statistics.median(t) for name, t in rounds.items()}
        rd = [recall_and_density(q[h].float(), k[h].float(), [specs[h]], scale, chunk=1024)[0] for h in range(heads)]
        density = sum(x[1] for x in rd) / heads
        row = {
            "seq_len": n, "heads": heads, "head_dim": head_dim, "block": block,
            "dtype": str(dtype).replace("torch.", ""),
            "patterns": [p.pattern + (f"/{p.stride}" if isinstance(p, Grid) else "") for p in pats],
            "density": round(density, 4), "density_per_head": [round(x[1], 4) for x in rd],
            "sdpa_s": round(med["sdpa"], 4), "flex_s": round(med["flex"], 4) if flex else None,
            "vlmfast_s": round(med["vlmfast"], 4), "estimate_s": round(estimate_s, 4),
            "speedup": round(paired_speedup(rounds, "sdpa", "vlmfast"), 3),
            "flex_speedup": round(paired_speedup(rounds, "sdpa", "flex"), 3) if flex else None,
            "ideal_speedup": round(1 / density, 3),
            "recall": round(sum(x[0] for x in rd) / heads, 4), "recall_per_head": [round(x[0], 4) for x in rd],
            "flex_compile_s": None if flex_compile_s is None else round(flex_compile_s, 1),
            "flex_mask_s": None if flex_mask_s is None else round(flex_mask_s, 3),
            "flex_vs_vlmfast_max_abs_diff": agree, "repeats": repeats,
        }
        row["efficiency"] = round(row["speedup"] / row["ideal_speedup"], 3)
        log(f"kernel {n}: sdpa {row['sdpa_s']}s flex {row['flex_s']}s vlmfast {row['vlmfast_s']}s "
            f"speedup {row['speedup']} ideal {row['ideal_speedup']} recall {row['recall']}")
        rows.append(row)
    return rows


# -- end to end: a Qwen2-VL-shaped proxy on a video -------------------------------------------------------------
def proxy_spec():
    from ..zoo.tiny import TinySpec

    #: Qwen2-VL layout at CPU size: 392 px frames -> 28 x 28 patches -> 14 x 14 = 196 tokens per 2 frames;
    #: a 2-layer Qwen2 decoder of width 512 (8 heads of 64, 2 KV heads: GQA like Qwen2-7B, MLP 1408), a
    #: 1-layer vision tower of width 64.
    return TinySpec(hidden=512, layers=2, heads=8, kv_heads=2, intermediate=1408, vision_hidden=64,
                    vision_layers=1, vision_heads=2, image_size=392, patch=14, seed=0)


VIDEO_PROMPT = "describe this picture in detail : what objects do you see ?"


def video_frames(frames: int, size: int = 392, seed: int = 0) -> np.ndarray:
    """A random (T, size, size, 3) uint8 video."""
    rng = np.random.default_rng(seed)
    return (rng.random((frames, size, size, 3)) * 255).astype("uint8")


def video_inputs(processor, frames: int, size: int = 392, seed: int = 0):
    """The processor's outputs for ``video_frames`` and ``VIDEO_PROMPT`` in Qwen2-VL's chat format (the tokens
    ``VLMAccelerator.generate(videos=[video], prompt=VIDEO_PROMPT)`` builds)."""
    text = (f"<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>{VIDEO_PROMPT}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return processor(videos=[video_frames(frames, size, seed)], text=[text], return_tensors="pt")


def video_layout_from_inputs(model, inputs) -> Layout:
    ids = inputs["input_ids"][0]
    m = model.config.vision_config.spatial_merge_size
    t, h, w = (int(x) for x in inputs["video_grid_thw"][0])
    grid = (t, h // m, w // m)
    pos = (ids == model.config.video_token_id).nonzero().squeeze(1)
    return Layout(ids.numel(), [Span(int(pos[0]), grid, torch.arange(pos.numel()), "video")])


def prefill_flops(model, n_tokens: int, n_patches: int, frame_patches: int, density: float = 1.0) -> dict:
    """Forward FLOPs (multiply-add = 2) of one prefill: vision tower + merger, LLM linear layers, attention
    (causal half, times the kept density). Logits only for the last position."""
    vc, tc = model.config.vision_config, model.config.get_text_config()
    dv, layers_v = vc.embed_dim, vc.depth
    ffv = int(dv * vc.mlp_ratio)
    vision = layers_v * (2 * n_patches * (4 * dv * dv + 2 * dv * ffv) + 4 * n_patches * frame_patches * dv)
    vision += 2 * (n_patches // 4) * (4 * dv * 4 * dv + 4 * dv * tc.hidden_size)
    d, ff, L = tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers
    hd = d // tc.num_attention_heads
    dq, dkv = tc.num_attention_heads * hd, tc.num_key_value_heads * hd
    linear = L * 2 * n_tokens * (d * dq + 2 * d * dkv + dq * d + 3 * d * ff) + 2 * d * tc.vocab_size
    attention = L * 2 * n_tokens * n_tokens * dq * density  # QK^T and PV over the causal half: 2 * 2 * n^2/2 * dq
    return {"vision": vision, "linear": linear, "attention": attention}


def qwen2_vl_7b_share(n: int, with_vit: bool = True) -> float:
    """Attention share of Qwen2-VL-7B's prefill FLOPs at n tokens (docs/methods/mminference.md, spec section 5):
    Qwen2-7B LLM 13.05 GFLOP/token linear, 2 * n * 3584 * 28 attention/token; ViT ~5.1 GFLOP/visual token."""
    att = 2 * n * 3584 * 28
    lin = 13.05e9 + (5.1e9 if with_vit else 0.0)
    return att / (att + lin)


def quick_proxy_spec():
    from ..zoo.tiny import TinySpec

    return TinySpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_layers=1,
                    vision_heads=2, image_size=112, patch=14, seed=0)


def end_to_end_rows(seq_lens=(16384,), repeats: int = 2, block: int = 128, spec=None, log=print) -> list[dict]:
    """Prefill of the Qwen2-VL-layout proxy on a random video through the public path,
    ``VLMAccelerator(model, processor, policy).generate(videos=[frames], prompt=..., max_new_tokens=1)``:
    dense = ``policy=None``, sparse = a policy holding ``MMInference(heads=<head_patterns() in every layer>,
    min_length=0, block=block)``. Each call's time is its ``stats.prefill_s``: from the processor's outputs to the
    first-token logits, i.e. vision tower + merger, assembling the LLM's input embeddings, the sparse run's
    layouts and the LLM prefill (the processor's tokenising / resizing and decoding are not in it).
    A warm-up call of each, not timed, records what the timed calls do not: the density the sparse run used
    (its stats' ``mminference`` stage entry) and the max abs difference of the first-token logits (the LM head
    applied to the final hidden state it is given, ``search.objective.last_hidden``)."""
    from ..accelerator import VLMAccelerator
    from ..policy import Policy
    from ..search.objective import last_hidden
    from ..sparse.method import HeadPatterns, MMInference, recording_density
    from ..zoo.tiny import tiny_qwen2_vl

    spec = spec or proxy_spec()
    model, processor = tiny_qwen2_vl(spec)
    tc = model.config.get_text_config()
    merge = model.config.vision_config.spatial_merge_size
    per_frame = (spec.image_size // (2 * spec.patch)) ** 2  # LLM tokens per temporal patch (2 frames)
    rows = []
    for target in seq_lens:
        frames = 2 * max(1, round((target - 40) / per_frame))
        video = video_frames(frames, spec.image_size)
        pats = head_patterns(tc.num_attention_heads)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "heads.json"
            HeadPatterns([{h: p for h, p in enumerate(pats)} for _ in range(tc.num_hidden_layers)],
                         "qwen2-vl-proxy", block).save(path)
            policy = Policy([MMInference(heads=str(path), min_length=0, block=block)])
            accs = {"dense": VLMAccelerator(model, processor, policy=None),
                    "sparse": VLMAccelerator(model, processor, policy=policy)}

            def prefill(name: str):
                return accs[name].generate(videos=[video], prompt=VIDEO_PROMPT, max_new_tokens=1).stats

            with last_hidden(model) as seen, recording_density():
                probe = {name: prefill(name) for name in accs}  # warm-up
            rounds = _round_times({name: lambda name=name: prefill(name).prefill_s for name in accs}, repeats,
                                  own_time=True)
        med = {name: statistics.median(t) for name, t in rounds.items()}
        with torch.inference_mode():
            dense_logits, sparse_logits = (model.get_output_embeddings()(h) for h in seen[:2])
        st = probe["sparse"]
        (stage,) = [x for x in st.stages if x["method"] == "mminference"]
        density = stage["density"]
        t, gh, gw = stage["visual_spans"][0]["grid"]  # LLM tokens: (frame groups, rows, columns)
        n = st.text_tokens + st.visual_tokens_in
        fl = prefill_flops(model, n, t * gh * gw * merge ** 2, gh * gw * merge ** 2, 1.0)
        share = fl["attention"] / sum(fl.values())
        ideal = 1 / ((1 - share) + share * density)
        row = {
            "seq_len": n, "video_frames": frames, "visual_tokens": st.video_tokens_in,
            "dense_s": round(med["dense"], 3), "sparse_s": round(med["sparse"], 3),
            "speedup": round(paired_speedup(rounds, "dense", "sparse"), 3), "ideal_speedup": round(ideal, 3),
            "attention_share": round(share, 4), "density": round(density, 4),
            "attention_share_qwen2_vl_7b": round(qwen2_vl_7b_share(n), 4),
            "ideal_speedup_qwen2_vl_7b": round(1 / ((1 - qwen2_vl_7b_share(n)) + qwen2_vl_7b_share(n) * density), 3),
            "logits_max_abs_diff": round(float((sparse_logits - dense_logits).abs().max()), 5),
            "proxy": {"hidden": tc.hidden_size, "layers": tc.num_hidden_layers, "heads": tc.num_attention_heads,
                      "kv_heads": tc.num_key_value_heads, "vision_layers": model.config.vision_config.depth},
            "repeats": repeats, "path": "VLMAccelerator.generate(videos=...)",
        }
        row["efficiency"] = round(row["speedup"] / row["ideal_speedup"], 3)
        log(f"end_to_end {n}: dense {row['dense_s']}s sparse {row['sparse_s']}s speedup {row['speedup']} "
            f"ideal {row['ideal_speedup']} (attention share {row['attention_share']})")
        rows.append(row)
    return rows


# -- recall on the embedded model -------------------------------------------------------------------------------


def recall_rows(model_name: str = "tiny-llava-shapes", heads: str = "tiny-llava-shapes", n_samples: int = 4,
                images: int = 8, log=print) -> dict:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from ..search.heads import evaluate_recall, shapes_samples
    from ..sparse.method import MMInference
    from ..zoo import resolve

    path = resolve(model_name)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    method = MMInference(heads=heads, min_length=0)
    samples = shapes_samples("test", n_samples, images)
    layers = evaluate_recall(model, processor, samples, method)
    patterns = method.head_patterns()
    assert patterns is not None  # loaded from ``heads``
    out = {"model": model_name, "heads": heads, "images_per_prompt": images, "prompts": n_samples, "split": "test",
           "block": method.block_size, "target_recall": patterns.meta.get("target_recall"),
           "layers": layers, "mean_recall": round(sum(r["recall"] for r in layers) / len(layers), 4),
           "min_layer_recall": min(r["recall"] for r in layers),
           "mean_density": round(sum(r["density"] for r in layers) / len(layers), 4)}
    log(f"recall {model_name}: per layer {[r['recall'] for r in layers]}, density {out['mean_density']}")
    return out


def run(json_path=None, *, seq_lens=(8192, 16384, 32768), heads: int = 4, head_dim: int = 64, block: int = 128,
        repeats: int = 3, e2e_lens=(16384,), e2e_repeats: int = 2, flex: bool = True, recall: bool = True,
        quick: bool = False, threads: int | None = None, log=print) -> dict:
    """Everything in one process; ``quick``: tiny sizes for smoke tests (2k-token kernel, ~600-token video on a
    tiny proxy, no FlexAttention compile, no recall)."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    spec = None
    if quick:
        seq_lens, heads, repeats, e2e_lens, e2e_repeats, flex, recall = (2048,), 4, 1, (600,), 1, False, False
        block, spec = 64, quick_proxy_spec()
    result: dict = {"meta": {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick,
                             "block": block}}
    result["kernel"] = kernel_rows(seq_lens, heads, head_dim, block, repeats, flex, log=log) if seq_lens else []
    result["end_to_end"] = end_to_end_rows(e2e_lens, e2e_repeats, block, spec, log=log) if e2e_lens else []
    if recall:
        result["recall"] = recall_rows(log=log)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict, markdown: bool = False) -> str:
    from .prefill import format_table

    parts = []
    if result.get("kernel"):
        head = ["seq_len", "density", "SDPA s", "Flex s", "vlmfast s", "speedup", "Flex speedup", "ideal", "eff",
                "recall"]
        body = [[str(r["seq_len"]), str(r["density"]), str(r["sdpa_s"]), str(r["flex_s"]), str(r["vlmfast_s"]),
                 str(r["speedup"]), str(r["flex_speedup"]), str(r["ideal_speedup"]), str(r["efficiency"]),
                 str(r["recall"])] for r in result["kernel"]]
        parts.append(format_table(head, body, markdown))
    if result.get("end_to_end"):
        head = ["seq_len", "dense s", "sparse s", "speedup", "ideal", "attention share", "density",
                "Qwen2-VL-7B share", "Qwen2-VL-7B ideal"]
        body = [[str(r["seq_len"]), str(r["dense_s"]), str(r["sparse_s"]), str(r["speedup"]), str(r["ideal_speedup"]),
                 str(r["attention_share"]), str(r["density"]), str(r["attention_share_qwen2_vl_7b"]),
                 str(r["ideal_speedup_qwen2_vl_7b"])] for r in result["end_to_end"]]
        parts.append(format_table(head, body, markdown))
    if result.get("recall"):
        rec = result["recall"]
        head = ["layer", "recall", "lowest head", "density"]
        body = [[str(r["layer"]), str(r["recall"]), str(r["min_head_recall"]), str(r["density"])]
                for r in rec["layers"]]
        parts.append(f"recall on {rec['model']} ({rec['images_per_prompt']} images x {rec['prompts']} prompts):\n"
                     + format_table(head, body, markdown))
    return "\n\n".join(parts)
