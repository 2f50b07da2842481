"""``vlmfast`` command line: generate, bench, policies, methods."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from .argtypes import Parser, fail, fraction, nonnegative_float, positive_int
from .datasets.shapes.scene import SPLITS
from .errors import VlmfastError

DEBUG_ENV = "VLMFAST_DEBUG"

FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def video_frames(spec: str) -> list[str]:
    """``--video``: a folder of frame images (sorted by name) or a glob of image files (sorted); no video
    decoding (extract frames first, e.g. ``ffmpeg -i clip.mp4 -vf fps=2 frames/%04d.png``)."""
    import glob
    from pathlib import Path

    from .errors import InputError

    path = Path(spec)
    if path.is_dir():
        files = sorted(str(f) for f in path.iterdir() if f.suffix.lower() in FRAME_SUFFIXES)
    elif path.is_file():
        raise InputError(f"--video {spec!r} is a file; vlmfast does not decode video files: pass a folder of frame "
                         "images or a glob of them (extract frames e.g. with ffmpeg -i clip.mp4 -vf fps=2 "
                         "frames/%04d.png)")
    else:
        files = sorted(f for f in glob.glob(spec) if Path(f).suffix.lower() in FRAME_SUFFIXES)
    if not files:
        raise InputError(f"--video {spec!r}: no frame images found (expected a folder of "
                         f"{'/'.join(FRAME_SUFFIXES)} files, or a glob matching them)")
    return files


def _generate(a) -> int:
    from .accelerator import VLMAccelerator

    policy = a.policy  # VLMAccelerator takes "auto" and "none" as they are
    videos = [video_frames(v) for v in a.video] if a.video else None  # checked before the model loads
    acc = VLMAccelerator.from_pretrained(a.model, policy=policy, local_files_only=a.local_files_only)
    out = acc.generate(images=a.image or None, videos=videos, prompt=a.prompt, max_new_tokens=a.max_new_tokens,
                       do_sample=a.temperature > 0, temperature=a.temperature or 1.0, top_p=a.top_p, seed=a.seed)
    if a.json:
        print(json.dumps({"text": out.text, "policy": acc.policy.to_dict(), "stats": out.stats.to_dict()}, indent=2))
    else:
        print(f"policy: {acc.policy.describe()}  [{acc.policy_origin}]")
        print(f"answer: {out.text}\n")
        print(out.stats.table())
    return 0


def _bench(a) -> int:
    from .bench import prefill as bench_prefill

    proxy = bench_prefill.PROXIES[a.family]
    rows = bench_prefill.run(a.json, family=a.family, spec=proxy.quick if a.quick else proxy.spec,
                             repeats=a.repeats, decode_tokens=a.decode_tokens, keeps=tuple(a.keep), threads=a.threads)
    print(bench_prefill.table(rows, markdown=a.markdown, columns=proxy.columns))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


def _eval(a) -> int:
    from .eval import shapes as shapes_eval

    policy = a.policy  # VLMAccelerator takes "auto" and "none" as they are
    res = shapes_eval.run(a.model, policy, a.split, a.limit, a.task.split(","), a.json, blank=a.blank,
                          batch=a.batch_size)
    print(shapes_eval.table(res))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


def _hallucination(a) -> int:
    from .eval import hallucination

    return hallucination.run(a)


def _export_lmms(a) -> int:
    from .integrations.lmms_eval import tasks

    return tasks.run(a)


def _bench_sparse(a) -> int:
    from .bench import sparse as bench_sparse

    result = bench_sparse.run(a.json, seq_lens=tuple(a.seq_lens), heads=a.heads, head_dim=a.head_dim, block=a.block,
                              repeats=a.repeats, e2e_lens=tuple(a.e2e_lens), e2e_repeats=a.e2e_repeats,
                              flex=not a.no_flex, recall=not a.no_recall, quick=a.quick, threads=a.threads)
    print(bench_sparse.table(result, markdown=a.markdown))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


def _bench_grounding(a) -> int:
    from .bench import grounding as bench_grounding
    from .bench import prefill as bench_prefill

    rows = bench_grounding.run(a.json, spec=bench_prefill.QUICK if a.quick else bench_prefill.PROXY,
                               sam_types=tuple(a.sam_type), repeats=a.repeats, decode_tokens=a.decode_tokens,
                               threads=a.threads)
    print(bench_grounding.table(rows, markdown=a.markdown))
    return 0


def _bench_prune(a) -> int:
    from .bench import prune as bench_prune

    methods = [m.strip() for m in a.methods.split(",") if m.strip()] if a.methods else None
    rows = bench_prune.run(a.json, model=a.model, limit=a.limit, repeats=a.repeats, keeps=tuple(a.keep),
                           policies=tuple(a.policy), methods=methods, split=a.split)
    print(f"accuracy: {a.model} on ShapesWorld {a.split}, {a.limit} scenes; speed: the LLaVA-1.5-shaped proxy")
    print(bench_prune.table(rows, markdown=a.markdown))
    if a.json:
        print(f"\nwrote {a.json}")
    return 0


def _search(a) -> int:
    from .search.run import main as search_main

    return search_main(a)


def _policies(a) -> int:
    from .policy import load_policy, shipped_policies

    for name, path in shipped_policies().items():
        pol = load_policy(path)
        print(f"{name:<16} {pol.describe()}\n{'':<16} {pol.description}")
    return 0


def _field_default(f):
    """A dataclass field's default, also for pydantic fields with a default factory (mminference's pattern)."""
    factory = getattr(f.default, "default_factory", None)
    return factory() if factory is not None else f.default


def _methods(a) -> int:
    import dataclasses

    from .registry import available, get_method

    for name in available():
        cls = get_method(name)
        fields = ", ".join(f"{f.name}={_field_default(f)!r}" for f in dataclasses.fields(cls))
        print(f"{name:<10} [{cls.stage}]  {fields}")
    return 0


def _demo(a) -> int:
    from .demo.app import run_from_args

    return run_from_args(a)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="vlmfast", description="Faster, more trustworthy VLM inference by policy.")
    p.add_argument("--debug", action="store_true", help=f"show the traceback of an error (or set {DEBUG_ENV}=1)")
    p.add_argument("--verbose", action="store_true",
                   help="vlmfast's info lines and transformers' own progress bars and messages (quiet by default)")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt about images or videos with a policy, print the answer and "
                                        "stats")
    g.add_argument("--model", required=True, help="hub id, local folder, or zoo name (tiny-random-llava, ...)")
    g.add_argument("--image", action="append", help="image file (repeat for several)")
    g.add_argument("--video", action="append", metavar="PATH_OR_GLOB",
                   help="a video as a folder of frame images or a glob of them, in name order (Qwen2-VL-family "
                        "models; repeat for several)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--policy", default="auto", help="shipped name, YAML path, 'auto' (default) or 'none'")
    g.add_argument("--max-new-tokens", type=positive_int, default=64)
    g.add_argument("--temperature", type=nonnegative_float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-p", type=fraction, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--local-files-only", action="store_true")
    g.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    g.set_defaults(func=_generate)

    b = sub.add_parser("bench", help="benchmarks (speed ratios measured side by side in one run)")
    bsub = b.add_subparsers(dest="bench", required=True)
    bp = bsub.add_parser("prefill", help="full vs. pruned prefill (FoPru, FastV; DivPrune on the multi-family "
                                         "proxies) on a random-weight proxy of a real model's layout")
    bp.add_argument("--family", choices=["llava", "qwen2.5-vl", "qwen3-vl", "llava-next"], default="llava",
                    help="the proxy's layout: llava (LLaVA-1.5, 576 visual tokens), qwen2.5-vl (Qwen2.5-VL-7B's "
                         "windowed tower, one 1,008 px image: 1,296 visual tokens), qwen3-vl (Qwen3-VL-8B, DeepStack, "
                         "one 1,024 px image: 1,024 visual tokens) or llava-next (LLaVA-v1.6-7B's anyres, one 672 px "
                         "image: 2,880 visual tokens)")
    bp.add_argument("--json", help="write the rows as JSON to this path")
    bp.add_argument("--repeats", type=positive_int, default=5)
    bp.add_argument("--decode-tokens", type=positive_int, default=8)
    bp.add_argument("--keep", type=fraction, nargs="+", default=[0.5, 0.25, 0.1])
    bp.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    bp.add_argument("--quick", action="store_true", help="a tiny proxy (seconds; for smoke tests only)")
    bp.add_argument("--markdown", action="store_true", help="print a Markdown table")
    bp.set_defaults(func=_bench)
    bs = bsub.add_parser("sparse", help="sparse prefill: kernel vs SDPA/FlexAttention, end-to-end video prefill, "
                                         "attention recall on the embedded model")
    bs.add_argument("--json", help="write the results as JSON to this path")
    bs.add_argument("--seq-lens", type=positive_int, nargs="*", default=[8192, 16384, 32768],
                    help="kernel sequence lengths")
    bs.add_argument("--heads", type=positive_int, default=4)
    bs.add_argument("--head-dim", type=positive_int, default=64)
    bs.add_argument("--block", type=positive_int, default=128, help="kernel block size in tokens")
    bs.add_argument("--repeats", type=positive_int, default=3)
    bs.add_argument("--e2e-lens", type=positive_int, nargs="*", default=[16384],
                    help="video lengths for the end-to-end proxy")
    bs.add_argument("--e2e-repeats", type=positive_int, default=2)
    bs.add_argument("--no-flex", action="store_true", help="skip FlexAttention (its compile takes minutes on CPU)")
    bs.add_argument("--no-recall", action="store_true", help="skip the recall measurement on tiny-llava-shapes")
    bs.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    bs.add_argument("--quick", action="store_true", help="tiny sizes (seconds; for smoke tests only)")
    bs.add_argument("--markdown", action="store_true", help="print Markdown tables")
    bs.set_defaults(func=_bench_sparse)
    bq = bsub.add_parser("prune", help="every pruner at 50/25/10/5%%: ShapesWorld accuracy + proxy speed")
    bq.add_argument("--json", help="write the rows as JSON to this path")
    bq.add_argument("--model", default="tiny-llava-shapes", help="model for the accuracy columns")
    bq.add_argument("--limit", type=positive_int, default=100, help="ShapesWorld scenes of --split for accuracy")
    bq.add_argument("--split", default="final", choices=SPLITS,
                    help="ShapesWorld split for accuracy (default final: kept for reported numbers, never used to "
                         "choose anything)")
    bq.add_argument("--methods", default="", help="comma-separated rows to run (default all: "
                    "fopru,vflowopt,fastervlm,visionzip,divprune,cdpruner,downsample,random,fastv,pyramiddrop,"
                    "zipvl-quant,zipvl-evict); the full model always runs")
    bq.add_argument("--repeats", type=positive_int, default=3)
    bq.add_argument("--keep", type=fraction, nargs="+", default=[0.5, 0.25, 0.1, 0.05])
    bq.add_argument("--policy", action="append", default=[], metavar="NAME_OR_PATH",
                    help="also bench this policy file (repeatable), e.g. tiny-llava-shapes-vflowopt-25")
    bq.add_argument("--markdown", action="store_true")
    bq.set_defaults(func=_bench_prune)
    bg = bsub.add_parser("grounding", help="what ground=True adds to a generate call, with SAM and the VLM at the "
                                           "compute ratio of SAM ViT-B/L/H and LLaVA-1.5-7B (random-weight proxies)")
    bg.add_argument("--json", help="write the rows as JSON to this path")
    bg.add_argument("--sam-type", nargs="+", default=["vit_b", "vit_l", "vit_h"], choices=["vit_b", "vit_l", "vit_h"])
    bg.add_argument("--repeats", type=positive_int, default=5)
    bg.add_argument("--decode-tokens", type=positive_int, default=8)
    bg.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's choice)")
    bg.add_argument("--quick", action="store_true", help="the tiny VLM proxy (for smoke tests only)")
    bg.add_argument("--markdown", action="store_true", help="print a Markdown table")
    bg.set_defaults(func=_bench_grounding)

    e = sub.add_parser("eval", help="accuracy / hallucination evaluations")
    esub = e.add_subparsers(dest="eval", required=True)
    es = esub.add_parser("shapes", help="VQA, POPE and CHAIR on ShapesWorld (offline)")
    es.add_argument("--model", default="tiny-llava-shapes")
    es.add_argument("--policy", default="none", help="shipped name, YAML path, 'auto' or 'none' (default)")
    es.add_argument("--split", default="test", choices=SPLITS,
                    help="ShapesWorld split (default test; final for reported numbers, dev for any choice)")
    es.add_argument("--limit", type=positive_int, default=200, help="number of scenes")
    es.add_argument("--task", default="vqa,pope,chair",
                    help="comma-separated subset of vqa,pope,chair,grounding (grounding: referring-expression masks)")
    es.add_argument("--blank", action="store_true", help="replace images by a gray image (chance control)")
    es.add_argument("--batch-size", type=positive_int, default=16)
    es.add_argument("--json", help="write the metrics as JSON to this path")
    es.set_defaults(func=_eval)
    from .eval.hallucination import add_arguments as hallucination_arguments  # light: no torch import
    from .integrations.lmms_eval.tasks import add_arguments as export_arguments  # light: no lmms-eval / datasets import

    hl = esub.add_parser("hallucination", help="baseline vs VAR / DAMRO / AGLA and combinations on ShapesWorld: "
                                               "POPE, CHAIR, VQA and decode cost in one table")
    hallucination_arguments(hl).set_defaults(func=_hallucination)
    ex = esub.add_parser("export-lmms", help="write ShapesWorld as offline lmms-eval tasks (parquet + YAML)")
    export_arguments(ex).set_defaults(func=_export_lmms)

    from .search.run import add_arguments as search_arguments

    se = sub.add_parser("search", help="find the policy closest to the unpruned model under a visual-token budget")
    search_arguments(se).set_defaults(func=_search)
    sub.add_parser("policies", help="list shipped policies").set_defaults(func=_policies)
    sub.add_parser("methods", help="list registered methods and their hyper-parameters").set_defaults(func=_methods)
    from .demo.app import add_arguments as demo_arguments  # light: Gradio is imported only when it runs

    demo = sub.add_parser("demo", help="the Gradio demo: plain model vs. policy side by side, with grounding masks")
    demo_arguments(demo).set_defaults(func=_demo)
    return p


@contextmanager
def _noise(verbose: bool) -> Iterator[None]:
    """Quiet by default: transformers' weight-loading bars and info lines off (unless TRANSFORMERS_VERBOSITY says
    otherwise); ``--verbose`` keeps them and turns on vlmfast's info lines. Restored after the command (main() is
    also called in-process, by tests and scripts)."""
    import logging

    from transformers.utils import logging as hf_logging

    own = logging.getLogger("vlmfast")
    saved = own.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if verbose:
        own.setLevel(logging.INFO)
    elif "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        own.setLevel(saved[0])
        hf_logging.set_verbosity(saved[1])
        (hf_logging.enable_progress_bar if saved[2] else hf_logging.disable_progress_bar)()


def main(argv: list[str] | None = None) -> int:
    """Run a command. Every error is one ``vlmfast: error: ...`` line and exit code 2: a bad option (argparse), a
    vlmfast error, or anything else raised while loading a model or running (named by its type); ``--debug`` or
    ``VLMFAST_DEBUG=1`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    try:
        with _noise(verbose=args.verbose or debug):
            return args.func(args)
    except VlmfastError as e:
        if debug:
            raise
        return fail(str(e))
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:  # noqa: BLE001  (the one place every other error is turned into one line)
        if debug:
            raise
        return fail(f"{type(e).__name__}: {e} (--debug shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
