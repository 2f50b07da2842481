"""lmms-eval model classes: ``lmms-eval --model vlmfast --model_args pretrained=...,policy=...``.

Two classes share one implementation (:class:`_VlmfastLMM`):

- :class:`VlmfastChat` (``is_simple=False``; what ``--model vlmfast`` resolves to): requests carry
  ``doc_to_messages``; images come from ``ChatMessages.extract_media()``.
- :class:`VlmfastSimple` (``is_simple=True``; ``--model vlmfast --force_simple``): requests carry
  ``doc_to_visual`` + a text context. Needed for ``loglikelihood`` / ``multiple_choice`` tasks, which lmms-eval
  only builds for simple models.

Both hand every request to :meth:`vlmfast.VLMAccelerator.generate` / ``.loglikelihood``: the prompt is the
plain user text (vlmfast applies the model's chat template and places the images itself) and the policy
is applied to every call. Per-sample vlmfast statistics (visual tokens in / kept, layer average, prefill
seconds, KV bytes, ...) are attached to each result as ``token_counts`` and so land in the
``--log_samples`` jsonl under ``token_counts[0]["vlmfast"]``; run-level averages go to the results JSON's
``throughput`` section (``avg_visual_tokens_kept`` etc.).

Model arguments (``--model_args k=v,...``; ``batch_size``, ``max_batch_size`` and ``device`` also come from
the lmms-eval flags of the same name):

``pretrained`` (required)
    hub id, local folder or vlmfast zoo name (``tiny-llava-shapes``, ``tiny-random-llava``, ...).
``policy`` (default ``auto``)
    ``auto`` (the shipped policy matching the model's name, else none), ``none`` (no methods), a shipped
    policy name (``llava-1.5-7b``), a YAML path, or an inline JSON policy ``{"methods": [...]}``.
``batch_size`` (default 1), ``max_batch_size``
    requests per ``generate`` call (grouped by identical generation kwargs). ``auto`` / ``auto:N`` use
    ``max_batch_size`` (or N, else 1): vlmfast does not probe memory.
``device`` (default: the accelerate process's device, else ``cuda`` when available, else ``cpu``),
``device_map`` (e.g. ``auto`` for single-process model parallelism), ``dtype`` (``auto``, ``float16``,
``bfloat16``, ``float32``), ``local_files_only``, ``seed`` (sampling seed), ``max_new_tokens`` (default 1024;
used when a task does not set it).

Generation kwargs: ``max_new_tokens``; ``temperature`` (0 or absent: greedy; > 0 samples unless
``do_sample: false``), ``top_p``, ``top_k``, ``repetition_penalty``; ``until`` (stop strings: the text is cut
before the first one). ``num_beams > 1`` is **not** supported: vlmfast decodes greedily or by sampling,
so the request is decoded greedily and a warning is logged once. Other keys are ignored (warned once).

``loglikelihood`` returns, like lmms-eval's built-in HF models, the continuation's **mean per-token negative
log-likelihood** (the loss; lmms-eval's ``multiple_choice`` scoring takes the argmin) and whether greedy
decoding would produce it. The continuation's leading whitespace is dropped (it is the assistant's reply).

Data parallelism: like the built-in ``llava_hf``: under ``accelerate launch --num_processes N`` each process
loads a full replica on its own device and lmms-eval shards the documents by rank. On CPU (gloo) launch with
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N -m lmms_eval ...`` (``accelerate launch
--cpu --num_processes N`` starts one process unless MPI is configured). See docs/lmms_eval.md.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from loguru import logger as eval_logger
from tqdm import tqdm

from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts, unwrap_generation_output
from lmms_eval.api.model import lmms

from ...accelerator import VLMAccelerator
from ...errors import InputError

__all__ = ["VlmfastChat", "VlmfastSimple", "VlmfastTokenCounts"]

IMAGE_PLACEHOLDERS = ("<image>",)
_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tiff", ".tif", ".webp"}
_DTYPES = {"float16": torch.float16, "fp16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}
_KNOWN_GEN_KEYS = {"max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "num_beams", "until",
                   "repetition_penalty"}
_HARMLESS_GEN_KEYS = {"use_cache", "image_aspect_ratio", "image_sizes", "pad_token_id", "eos_token_id"}
_VIDEO_MSG = ("vlmfast's lmms-eval model does not take video input yet (got {what}); use image tasks, "
              "or sample frames into images in the task")
_DEFAULT_MAX_NEW_TOKENS = 1024


@dataclass
class VlmfastTokenCounts(TokenCounts):
    """lmms-eval's per-request ``TokenCounts`` plus vlmfast's per-sample statistics.

    lmms-eval writes ``token_counts.to_dict()`` into each logged sample; this adds ``"vlmfast": {...}``
    (:meth:`vlmfast.Stats.to_dict` plus the process ``rank``).
    """

    vlmfast: dict | None = None

    def to_dict(self) -> dict:
        d: dict = super().to_dict()
        if self.vlmfast is not None:
            d["vlmfast"] = self.vlmfast
        return d


def _tuples_survive_unwrap() -> bool:
    """lmms-eval 0.7.3's ``unwrap_generation_output`` turns ``(float, bool)`` results into their ``str()``,
    which breaks loglikelihood scoring; detect that so ``loglikelihood`` can wrap its tuples."""
    probe = (-1.0, True)
    return unwrap_generation_output(probe)[0] == probe


def _parse_batch_size(batch_size: Any, max_batch_size: Any) -> int:
    if max_batch_size is not None and (not isinstance(max_batch_size, int) or isinstance(max_batch_size, bool)
                                       or max_batch_size < 1):
        raise InputError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if isinstance(batch_size, str):
        s = batch_size.strip().lower()
        if s.startswith("auto"):
            n = s.split(":", 1)[1] if ":" in s else ""
            chosen = int(n) if n.isdigit() and int(n) >= 1 else (max_batch_size or 1)
            eval_logger.warning(f"vlmfast: batch_size={batch_size!r}: vlmfast does not probe batch sizes; "
                                f"using {chosen} (set batch_size=N or max_batch_size=N)")
            return chosen
        if s.isdigit():
            batch_size = int(s)
    if isinstance(batch_size, float) and batch_size.is_integer():
        batch_size = int(batch_size)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise InputError(f"batch_size must be an integer >= 1 or 'auto', got {batch_size!r}")
    return batch_size


def _parse_policy(policy: Any):
    """lmms-eval model_args value -> what :class:`VLMAccelerator` takes (None, 'auto', name/path, dict)."""
    if policy is None:
        return None
    if not isinstance(policy, str):
        raise InputError(f"policy must be 'auto', 'none', a shipped name, a YAML path or inline JSON, got {policy!r}")
    s = policy.strip()
    if s.lower() in ("", "none", "null"):
        return None
    if s.lower() == "auto":
        return "auto"
    if s.startswith("{"):
        try:
            return json.loads(s)
        except json.JSONDecodeError as e:
            raise InputError(f"policy looks like inline JSON but does not parse: {e}: {s!r}") from None
    return s


def _parse_dtype(dtype: Any):
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return "auto" if dtype is None else dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise InputError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {dtype!r}")


def _strip_placeholders(text: str) -> str:
    """Remove ``<image>`` placeholders (vlmfast places the images itself); other text is kept verbatim."""
    if not any(ph in text for ph in IMAGE_PLACEHOLDERS):
        return text
    for ph in IMAGE_PLACEHOLDERS:
        text = text.replace(f"{ph}\n", "").replace(ph, "")
    return text.strip()


def _flatten(xs) -> list:
    out: list = []
    if xs is None:
        return out
    if not isinstance(xs, (list, tuple)):
        return [xs]
    for x in xs:
        out.extend(_flatten(x) if isinstance(x, (list, tuple)) else [x])
    return out


def _check_visuals(visuals: list, where: str) -> list:
    """Keep images (PIL, arrays, image-file paths); refuse video / audio clearly."""
    out = []
    for v in visuals:
        if isinstance(v, (str, Path)):
            if Path(str(v)).suffix.lower() not in _IMAGE_EXTS:
                raise NotImplementedError(_VIDEO_MSG.format(what=f"{where}: {str(v)!r}"))
        elif isinstance(v, dict):
            raise NotImplementedError(_VIDEO_MSG.format(what=f"{where}: a {v.get('type', 'media')} dict"))
        out.append(v)
    return out


def _truncate(text: str, until: list[str]) -> str:
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


class _VlmfastLMM(lmms):
    """Shared implementation; use :class:`VlmfastChat` or :class:`VlmfastSimple`."""

    def __init__(
        self,
        pretrained: str | None = None,
        policy: Any = "auto",
        batch_size: Any = 1,
        max_batch_size: Any = None,
        device: str | None = None,
        device_map: str | None = None,
        dtype: Any = "auto",
        local_files_only: bool = False,
        seed: int | None = None,
        max_new_tokens: int = _DEFAULT_MAX_NEW_TOKENS,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise InputError(
                f"vlmfast lmms-eval model: unknown model_args {sorted(kwargs)}; accepted: pretrained, policy, "
                "batch_size, max_batch_size, device, device_map, dtype, local_files_only, seed, max_new_tokens"
            )
        if not pretrained or not isinstance(pretrained, str):
            raise InputError("vlmfast lmms-eval model: pass the model with --model_args pretrained=<hub id | path | "
                             f"zoo name>, got pretrained={pretrained!r}")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise InputError(f"seed must be an integer, got {seed!r}")
        if not isinstance(local_files_only, bool):
            raise InputError(f"local_files_only must be true or false, got {local_files_only!r}")
        if device_map is not None and not isinstance(device_map, str):
            raise InputError(f"device_map must be a string such as 'auto', got {device_map!r}")
        self.batch_size_per_gpu = _parse_batch_size(batch_size, max_batch_size)
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.pretrained = pretrained
        policy_spec = _parse_policy(policy)
        dtype = _parse_dtype(dtype)

        accelerator = Accelerator()
        self.accelerator = accelerator
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if world > 1 and accelerator.num_processes == 1:
            raise InputError(
                f"WORLD_SIZE={world} but accelerate sees a single process (distributed type "
                f"{accelerator.distributed_type}). On CPU, launch with `ACCELERATE_USE_CPU=1 accelerate launch "
                "--multi_gpu --num_processes N -m lmms_eval ...` (gloo); `accelerate launch --cpu` alone starts one "
                "process unless MPI is configured."
            )
        if accelerator.num_processes > 1:
            if device_map not in (None, ""):
                raise InputError(f"device_map={device_map!r} cannot be combined with data parallelism "
                                 f"({accelerator.num_processes} processes): each process holds a full replica")
            self._device = torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device
            load_map: Any = str(self._device)
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise InputError(f"device={device!r} is not a torch device: {e}") from None
            load_map = device_map if device_map not in (None, "") else str(self._device)
        self.acc = VLMAccelerator.from_pretrained(pretrained, policy=policy_spec, local_files_only=local_files_only,
                                                  dtype=dtype, device_map=load_map)
        if load_map == "auto":
            self._device = self.acc.model.device
        pol = self.acc.policy
        self.policy_name = "none" if pol.is_empty else (pol.name or pol.source)
        where = f"rank {self._rank}/{self._world_size}" if self._world_size > 1 else "single process"
        eval_logger.info(f"vlmfast: {pretrained} on {self._device} ({where}), policy {self.policy_name} "
                             f"({self.acc.policy_origin}), batch size {self.batch_size_per_gpu}")
        self._warned: set[str] = set()
        self._wrap_ll = not _tuples_survive_unwrap()

    # -- properties lmms-eval and users read ------------------------------------------------------------------
    @property
    def model(self):
        return self.acc.model

    @property
    def processor(self):
        return self.acc.processor

    @property
    def tokenizer(self):
        return self.acc.processor.tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    # -- helpers ---------------------------------------------------------------------------------------------
    def _warn_once(self, key: str, msg: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            eval_logger.warning(msg)

    def _doc(self, task: str, split: str, doc_id: int):
        return self.task_dict[task][split][doc_id]

    def _generation_args(self, gen_kwargs: dict | None) -> tuple[dict, list[str]]:
        """lmms-eval generation kwargs -> (kwargs of VLMAccelerator.generate, stop strings)."""
        g = dict(gen_kwargs or {})
        until = g.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
            until = list(until)
        else:
            raise InputError(f"generation kwarg 'until' must be a string or a list of strings, got {until!r}")
        max_new = g.pop("max_new_tokens", None)
        max_new = self.max_new_tokens if max_new is None else max_new
        if isinstance(max_new, float) and max_new.is_integer():
            max_new = int(max_new)
        if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
            raise InputError(f"generation kwarg max_new_tokens must be an integer >= 1, got {max_new!r}")
        temperature = g.pop("temperature", None)
        temperature = 0.0 if temperature is None else float(temperature)
        do_sample = g.pop("do_sample", None)
        top_p, top_k, rep = g.pop("top_p", None), g.pop("top_k", None), g.pop("repetition_penalty", None)
        num_beams = g.pop("num_beams", None)
        if num_beams is not None and int(num_beams) > 1:
            self._warn_once(f"beams{num_beams}", f"vlmfast: num_beams={num_beams} is not supported (vlmfast decodes "
                            "greedily or by sampling); decoding these requests greedily")
        sample = temperature > 0 and do_sample is not False
        args: dict[str, Any] = {"max_new_tokens": max_new, "do_sample": sample}
        if sample:
            args["temperature"] = temperature
            args["top_p"] = float(top_p) if top_p not in (None, 0) else 1.0
            args["top_k"] = int(top_k or 0)
            args["seed"] = self.seed
        if rep not in (None, 1, 1.0):
            args["repetition_penalty"] = float(rep)
        ignored = sorted(k for k in g if k not in _HARMLESS_GEN_KEYS)
        if ignored:
            self._warn_once(f"ignored{ignored}", f"vlmfast: ignoring generation kwargs {ignored} "
                            f"(supported: {sorted(_KNOWN_GEN_KEYS)})")
        return args, until

    def _request_inputs(self, args: tuple) -> tuple[list, str]:
        """(images, prompt) of one generate_until request; layout depends on the class."""
        raise NotImplementedError

    @staticmethod
    def _gen_kwargs_of(args: tuple) -> dict:
        raise NotImplementedError

    def _sample_stats(self, out) -> dict:
        """``Stats.to_dict()``, the data-parallel rank, and ``prefill_s_share``: the sample's share of its batch's
        prefill time (``prefill_s`` is the whole batch's, ``batch_size`` samples shared it)."""
        d = out.stats.to_dict()
        d["rank"] = self.rank
        d["prefill_s_share"] = out.stats.share(out.stats.prefill_s)
        return d

    # -- the lmms interface ----------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        if not requests:
            return []
        reqs = [r.args for r in requests]
        gen_of = self._gen_kwargs_of
        # group by identical generation kwargs (one generate call per batch), longest prompts first
        collator = lmms_utils.Collator(reqs, lambda a: (-len(a[0] or ""), a[-2], a[-3]), group_fn=gen_of,
                                       grouping=True)
        pbar = tqdm(total=len(reqs), disable=(self.rank != 0), desc="vlmfast generate")
        res: list[GenerationResult] = []
        n_tokens, elapsed = 0, 0.0
        vis_in, vis_kept, layer_avg, prefill = [], [], [], []
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            gen_args, until = self._generation_args(gen_of(chunk[0]))
            jobs = [self._request_inputs(a) for a in chunk]
            t0 = time.perf_counter()
            outs = self.acc.generate(images=[imgs for imgs, _ in jobs], prompt=[p for _, p in jobs], **gen_args)
            elapsed += time.perf_counter() - t0
            for a, out in zip(chunk, outs):
                text = _truncate(out.text, until)
                n_tokens += len(out.token_ids)
                st = out.stats
                vis_in.append(st.visual_tokens_in)
                vis_kept.append(st.visual_tokens_kept)
                layer_avg.append(st.layer_avg_visual_tokens)
                prefill.append(st.share(st.prefill_s))  # per sample: a batch of 8 shares one prefill
                counts = VlmfastTokenCounts(output_tokens=len(out.token_ids), vlmfast=self._sample_stats(out))
                res.append(GenerationResult(text=text, token_counts=counts))
                self.cache_hook.add_partial("generate_until", (a[0], gen_of(a)), text)
            pbar.update(len(chunk))
        pbar.close()
        res = collator.get_original(res)
        self._log_metrics(elapsed, n_tokens, len(reqs), vis_in, vis_kept, layer_avg, prefill)
        return res

    def _log_metrics(self, elapsed, n_tokens, n_requests, vis_in, vis_kept, layer_avg, prefill) -> None:
        try:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics
        except ImportError:  # pragma: no cover - older lmms-eval
            return

        def mean(xs):
            return float(sum(xs) / len(xs)) if xs else 0.0

        log_metrics(total_elapsed_time=elapsed, total_gen_tokens=n_tokens,
                    avg_speed=n_tokens / elapsed if elapsed > 0 else 0.0,
                    additional_metrics={"total_requests": n_requests, "visual_tokens_in": mean(vis_in),
                                        "visual_tokens_kept": mean(vis_kept),
                                        "layer_avg_visual_tokens": mean(layer_avg),
                                        "prefill_s_per_sample": mean(prefill)})

    def loglikelihood(self, requests: list[Instance]) -> list:
        """Mean per-token NLL of each continuation (lmms-eval's built-in convention) and is-greedy."""
        if not requests:
            return []
        tok = self.acc.processor.tokenizer
        jobs = []
        for r in requests:
            ctx, target, doc_to_visual, doc_id, task, split = r.args
            doc = self._doc(task, split, doc_id)
            cont = target if isinstance(target, str) else target(doc)
            if isinstance(cont, (list, tuple)):
                cont = cont[0]
            cont = str(cont).lstrip()
            visuals = _check_visuals(_flatten(doc_to_visual(doc) if callable(doc_to_visual) else doc_to_visual),
                                     f"{task} doc {doc_id}")
            jobs.append((visuals, _strip_placeholders(ctx or ""), cont))
        pbar = tqdm(total=len(jobs), disable=(self.rank != 0), desc="vlmfast loglikelihood")
        res = []
        for i in range(0, len(jobs), self.batch_size):
            chunk = jobs[i:i + self.batch_size]
            outs = self.acc.loglikelihood(images=[j[0] for j in chunk], prompt=[j[1] for j in chunk],
                                          continuation=[j[2] for j in chunk])
            for (_, ctx, cont), (logprob, greedy) in zip(chunk, outs):
                n = len(tok(cont, add_special_tokens=False)["input_ids"])
                pair = (-logprob / max(1, n), bool(greedy))
                if self._wrap_ll:
                    counts = VlmfastTokenCounts(output_tokens=n, vlmfast={"logprob": logprob, "continuation_tokens": n,
                                                                          "rank": self.rank})
                    res.append(GenerationResult(text=pair, token_counts=counts))  # type: ignore[arg-type]
                else:
                    res.append(pair)
                self.cache_hook.add_partial("loglikelihood", (ctx, cont), pair)
            pbar.update(len(chunk))
        pbar.close()
        return res

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(
            "vlmfast's lmms-eval model does not support generate_until_multi_round (multi-round tasks) yet: "
            "VLMAccelerator.generate answers one user turn per request"
        )


class VlmfastChat(_VlmfastLMM):
    """Chat-protocol model (``--model vlmfast``): requests ``(ctx, doc_to_messages, gen_kwargs, doc_id, task,
    split)``. The prompt is the user turn's text (a system message's text, if any, is prepended on its own
    line); images are taken from the messages in order."""

    is_simple = False

    @staticmethod
    def _gen_kwargs_of(args: tuple) -> dict:
        return args[2]

    def _request_inputs(self, args: tuple) -> tuple[list, str]:
        from lmms_eval.protocol import ChatMessages

        ctx, doc_to_messages, _gen, doc_id, task, split = args
        raw = doc_to_messages(self._doc(task, split, doc_id)) if callable(doc_to_messages) else doc_to_messages
        messages = ChatMessages(messages=raw)
        images, videos, audios = messages.extract_media()
        if videos:
            raise NotImplementedError(_VIDEO_MSG.format(what=f"{task} doc {doc_id}: {len(videos)} video(s)"))
        if audios:
            raise NotImplementedError(f"vlmfast's lmms-eval model does not take audio input ({task} doc {doc_id})")
        system: list[str] = []
        user: list[str] = []
        for m in messages.messages:
            texts = [c.text for c in m.content if c.type == "text"]
            if m.role == "assistant":
                raise NotImplementedError(
                    f"{task} doc {doc_id}: multi-turn conversations (an assistant turn, e.g. few-shot as multi-turn) "
                    "are not supported; vlmfast answers one user turn")
            (system if m.role == "system" else user).extend(texts)
        if system:
            self._warn_once("system", "vlmfast: system messages are prepended to the user text (one user turn)")
        prompt = "\n".join([*system, *user]) if (system or user) else (ctx or "")
        return _check_visuals(_flatten(images), f"{task} doc {doc_id}"), _strip_placeholders(prompt)


class VlmfastSimple(_VlmfastLMM):
    """Simple-protocol model (``--model vlmfast --force_simple``; loglikelihood / multiple-choice tasks):
    requests ``(ctx, gen_kwargs, doc_to_visual, doc_id, task, split)``. ``<image>`` placeholders in the
    context are removed (vlmfast places the images)."""

    is_simple = True

    @staticmethod
    def _gen_kwargs_of(args: tuple) -> dict:
        return args[1]

    def _request_inputs(self, args: tuple) -> tuple[list, str]:
        ctx, _gen, doc_to_visual, doc_id, task, split = args
        visuals = doc_to_visual(self._doc(task, split, doc_id)) if callable(doc_to_visual) else doc_to_visual
        return _check_visuals(_flatten(visuals), f"{task} doc {doc_id}"), _strip_placeholders(ctx or "")
