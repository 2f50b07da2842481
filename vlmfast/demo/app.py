"""The Gradio page: an image and a prompt in, two columns out (the plain model and the policy), each with the
answer, the stats, the kept visual tokens and the grounding masks over the attention heat map.

``vlmfast demo [--model NAME] [--port N] [--host 127.0.0.1]`` starts it; ``build_demo(engine)`` returns the
``gr.Blocks`` (for tests, or to mount in another app). Requests go through Gradio's queue one at a time.
Errors (a bad YAML, a file that is not an image, an image too large) are shown in the page as messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..argtypes import Parser, port, positive_int
from ..errors import InputError, VlmfastError
from . import engine as E

log = logging.getLogger("vlmfast")

RUN_API = "run"
"""the endpoint clients call: ``Client(url).predict(..., api_name="/run")``"""


def _gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline machines: no phone-home
    try:
        import gradio as gr
    except ImportError:
        raise VlmfastError("the demo needs Gradio: pip install 'vlmfast[demo]'") from None
    _atomic_picture_cache()
    return gr


def _atomic_picture_cache() -> None:
    """Make Gradio write the pictures it serves atomically.

    Gradio stores a returned picture under the hash of its bytes with ``save_pil_to_cache``, which rewrites the file
    in place (truncate, then write) even when it exists. Two concurrent requests that return the same picture (the
    unpruned token grid of one image, the same mask) then race: one client downloads the file while the other
    request rewrites it, and the server fails the download ("Too little data for declared Content-Length"). The
    replacement writes under a temporary name and renames into place, as Gradio's own ``save_file_to_cache``
    does; an existing file (its name is a hash of the bytes) is only touched, as Gradio touches its cached copies."""
    from gradio import processing_utils as pu

    if getattr(pu.save_pil_to_cache, "vlmfast_atomic", False) or not all(
            hasattr(pu, f) for f in ("encode_pil_to_bytes", "hash_bytes")):
        return

    def save_pil_to_cache(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
        data = pu.encode_pil_to_bytes(img, format)
        folder = Path(cache_dir) / pu.hash_bytes(data)
        folder.mkdir(exist_ok=True, parents=True)
        path = (folder / f"{name}.{format}").resolve()
        if path.exists():  # touched, as Gradio's own cache does: `delete_cache` ages files by their times
            try:
                os.utime(path)
            except OSError:
                pass
            return str(path)
        fd, staging = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(staging, path)
        return str(path)

    save_pil_to_cache.vlmfast_atomic = True  # type: ignore[attr-defined]  # a marker on the function, read by getattr
    pu.save_pil_to_cache = save_pil_to_cache


def _path(payload) -> str | None:
    """The file path in a raw (not preprocessed) upload payload: a FileData dict, a path, or None."""
    if payload is None or isinstance(payload, str):
        return payload or None
    if isinstance(payload, dict):
        return payload.get("path") or None
    return getattr(payload, "path", None)


def _policy_yaml(policy, notes: list[str]) -> str:
    body = policy.to_yaml() if not policy.is_empty else "methods: []   # the plain model\n"
    text = f"**Effective policy** ({policy.describe()})\n\n```yaml\n{body}```"
    if notes:
        text += "\n\n" + "\n".join(f"* {n}" for n in notes)
    return text


def build_demo(engine: E.DemoEngine):
    """The page for ``engine``'s model. Launch it with ``launch(demo, ...)`` (or ``demo.launch``)."""
    gr = _gradio()
    pruners, halluc = E.method_choices()
    start_policy = engine.resolve_policy(engine.default_policy)
    start = E.knobs_of(start_policy)

    def fail(e: Exception):
        """A message in the page, never a stack trace: vlmfast's own errors as they are (a visitor's mistake: not
        logged, no server-side traceback), others named and logged with their traceback."""
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, VlmfastError):
            return gr.Error(str(e), title="vlmfast", print_exception=False)
        log.exception("demo: unexpected error")
        return gr.Error(f"{type(e).__name__}: {e}", title="internal error")

    def effective_policy(choice, yaml_path, pruner, keep, hallucination):
        base = engine.resolve_policy(choice, yaml_path)
        return E.apply_knobs(base, pruner, keep, hallucination)

    def on_policy(choice, yaml_path):
        """A policy was picked (or uploaded): set the knobs to reproduce it."""
        try:
            if choice == E.UPLOADED and not yaml_path:
                return gr.update(), gr.update(), gr.update(), "Upload a policy YAML file (below the policy menu)."
            pol = engine.resolve_policy(choice, yaml_path)
            k = E.knobs_of(pol)
            return k.pruner, k.keep, k.hallucination, _policy_yaml(pol, [])
        except Exception as e:  # noqa: BLE001 - every failure becomes a message in the page
            raise fail(e) from None

    def on_upload(yaml_path):
        if not yaml_path:
            return gr.update()
        try:
            engine.resolve_policy(E.UPLOADED, yaml_path)  # validate now, so a bad file is reported at once
        except Exception as e:  # noqa: BLE001
            raise fail(e) from None
        return E.UPLOADED

    def on_knobs(choice, yaml_path, pruner, keep, hallucination):
        try:
            pol, notes = effective_policy(choice, yaml_path, pruner, keep, hallucination)
            return _policy_yaml(pol, notes)
        except Exception as e:  # noqa: BLE001
            return f"**Policy error:** {e}"

    def run(image, prompt, choice, yaml_file, pruner, keep, hallucination, ground, phrases, max_new_tokens):
        """Inputs arrive raw (``preprocess=False``): the engine opens the uploads itself, so a file that is not
        an image, or one too large, is a plain message rather than Gradio's preprocessing report."""
        try:
            policy, notes = effective_policy(choice, _path(yaml_file), pruner, float(keep), hallucination)
            res = engine.run(_path(image), prompt, policy, ground=bool(ground), max_new_tokens=int(max_new_tokens),
                             phrases=phrases, notes=notes)
            outs = []
            for side, ref in ((res.full, None), (res.tuned, res.full)):
                base, anns, colors = res.grounding_view(side)
                outs += [side.output.text, E.stats_markdown(side, ref), res.token_overlay(side),
                         gr.AnnotatedImage(value=(base, anns), color_map=colors or None)]
            note = _policy_yaml(res.tuned.policy, res.notes)
            if not engine.can_ground and ground:
                gr.Warning("grounding not available in this vlmfast build: masks are not shown")
            elif ground and not (res.tuned.grounding or res.full.grounding):
                note += "\n* grounding: no object phrase to ground in the answers"
            return (*outs, note)
        except Exception as e:  # noqa: BLE001
            raise fail(e) from None

    with gr.Blocks(title="vlmfast demo") as demo:
        gr.Markdown(
            f"## vlmfast — `{engine.model_name}`\n"
            "Ask about an image; the same request runs on the plain model (left) and with a policy (right). "
            "Dark cells are visual tokens the policy dropped before the language model; masks come from the "
            "model's own attention turned into point prompts for SAM."
            + ("" if engine.can_ground else "\n\n*Grounding not available in this vlmfast build.*")
        )
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="image", type="filepath", sources=["upload", "clipboard"], height=320,
                                 elem_id="input-image")
                prompt = gr.Textbox(label="prompt", value=E.EXAMPLES[0][1], elem_id="prompt")
                shipped = [[str(E.example_path(s)), p] for s, p in E.EXAMPLES if E.example_path(s).is_file()]
                gr.Examples(examples=shipped, inputs=[image, prompt], label="ShapesWorld examples")
            with gr.Column(scale=1):
                policy = gr.Dropdown(engine.policy_choices(), value=engine.default_policy, label="policy",
                                     elem_id="policy")
                yaml_file = gr.File(label="or upload a policy YAML", file_types=[".yaml", ".yml"], type="filepath",
                                    height=120)
                with gr.Row():
                    pruner = gr.Dropdown([E.AS_POLICY, E.NONE, *pruners], value=start.pruner, label="pruner")
                    keep = gr.Slider(0.05, 1.0, value=start.keep, step=0.05, label="keep ratio")
                with gr.Row():
                    hallucination = gr.Dropdown([E.OFF, E.AS_POLICY, *halluc], value=start.hallucination,
                                                label="hallucination mitigation")
                    ground = gr.Checkbox(value=True, label="grounding masks", interactive=engine.can_ground)
                phrases = gr.Textbox(label="also ground these phrases of the prompt (comma-separated)",
                                     placeholder="e.g. the hexagon   (empty: the object words of the answer)",
                                     interactive=engine.can_ground_phrases, elem_id="phrases")
                with gr.Accordion("generation", open=False):
                    max_new = gr.Slider(1, 128, value=24, step=1, label="max new tokens")
                run_btn = gr.Button("Run", variant="primary", elem_id="run")
                policy_md = gr.Markdown(_policy_yaml(start_policy, []), elem_id="policy-yaml")
        outputs = []
        with gr.Row():
            for key, title in (("full", "Full model (no methods)"), ("policy", "With policy")):
                with gr.Column():
                    gr.Markdown(f"### {title}")
                    answer = gr.Textbox(label="answer", interactive=False, elem_id=f"answer-{key}")
                    with gr.Row():
                        tokens = gr.Image(label="kept visual tokens (dark: dropped)", interactive=False,
                                          format="png", height=300, elem_id=f"tokens-{key}")
                        masks = gr.AnnotatedImage(label="grounding: masks over the attention heat map", format="png",
                                                  height=300, elem_id=f"masks-{key}")
                    stats = gr.Markdown(elem_id=f"stats-{key}")
                    outputs += [answer, stats, tokens, masks]
        knobs = [policy, yaml_file, pruner, keep, hallucination]
        yaml_file.upload(on_upload, [yaml_file], [policy], api_visibility="private")
        policy.change(on_policy, [policy, yaml_file], [pruner, keep, hallucination, policy_md],
                      api_visibility="private")
        for k in (pruner, keep, hallucination):
            k.change(on_knobs, knobs, [policy_md], api_visibility="private")
        inputs = [image, prompt, *knobs, ground, phrases, max_new]
        run_btn.click(run, inputs, [*outputs, policy_md], api_name=RUN_API, preprocess=False)
        prompt.submit(run, inputs, [*outputs, policy_md], api_visibility="private", preprocess=False)
    demo.queue(default_concurrency_limit=1, max_size=64)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int | None = 7860, *, block: bool = True, **kwargs: Any):
    """Serve ``demo`` on ``host:port`` (queue on, errors shown in the page, uploads up to 50 MB)."""
    from .engine import EXAMPLES_DIR

    kwargs.setdefault("max_file_size", "50mb")
    return demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True,
                       allowed_paths=[str(EXAMPLES_DIR)], share=False, **kwargs)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default=E.DEFAULT_MODEL,
                   help=f"hub id, local folder or zoo name (default: the embedded {E.DEFAULT_MODEL})")
    p.add_argument("--policy", default="auto",
                   help="policy selected at start: a shipped name, 'none' or 'auto' (the model's shipped policy)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port, default=7860, help="port (default 7860)")
    p.add_argument("--allow-policy-paths", action="store_true",
                   help="let uploaded policies name files on this machine (SAM checkpoints, head files, matcher "
                        "folders); off by default, since the errors would tell visitors which files exist")
    p.add_argument("--max-image-pixels", type=positive_int, default=E.MAX_PIXELS, help="larger uploads are refused")
    p.add_argument("--device", default=None, help="where the model runs: cpu (default), cuda, cuda:1, auto, ...")
    p.add_argument("--local-files-only", action="store_true", help="never contact the hub for --model")
    return p


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server holds before the model loads (Gradio's own error comes after, as a traceback)."""
    import socket

    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise InputError(f"cannot serve on {host}:{port}: {e.strerror or e} (another server, or an earlier "
                             "demo, holds it; pick another with --port)") from None


def run_from_args(a: argparse.Namespace) -> int:
    gr = _gradio()  # fail early, before loading the model, when Gradio is missing
    del gr
    check_port_free(a.host, a.port)
    eng = E.DemoEngine.load(a.model, local_files_only=a.local_files_only, device_map=a.device,
                            max_pixels=a.max_image_pixels, default_policy=a.policy,
                            allow_policy_paths=a.allow_policy_paths)
    demo = build_demo(eng)
    print(f"vlmfast demo: {a.model} on http://{a.host}:{a.port}/  (Ctrl+C to stop)", flush=True)
    launch(demo, a.host, a.port, block=True, quiet=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="vlmfast demo", description=__doc__.splitlines()[0])
    a = add_arguments(parser).parse_args(argv)
    try:
        return run_from_args(a)
    except VlmfastError as e:
        print(f"vlmfast: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
