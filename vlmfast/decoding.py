"""The decode loop: greedy or sampling with transformers' own logits processors and warpers."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError


@dataclass
class GenerationArgs:
    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def __post_init__(self):
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature!r} (use do_sample=False for greedy)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (0 disables it), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")

    def processors(self):
        from transformers.generation.logits_process import (
            LogitsProcessorList,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        procs = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            procs.append(RepetitionPenaltyLogitsProcessor(self.repetition_penalty))
        if self.do_sample:
            if self.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(self.temperature))
            if self.top_k > 0:
                procs.append(TopKLogitsWarper(self.top_k))
            if self.top_p < 1.0:
                procs.append(TopPLogitsWarper(self.top_p))
        return procs


class TokenChooser:
    """Applies processors, then argmax or a (seeded) multinomial draw."""

    def __init__(self, args: GenerationArgs, device: torch.device):
        self.args = args
        self.procs = args.processors()
        self.generator = None
        if args.do_sample and args.seed is not None:
            self.generator = torch.Generator(device=device).manual_seed(args.seed)

    def __call__(self, ids_so_far: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        scores = self.procs(ids_so_far, logits) if len(self.procs) else logits
        if not self.args.do_sample:
            return scores.argmax(-1)
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


def kv_cache_bytes(cache) -> list[int]:
    """Bytes held by a transformers Cache, per batch row."""
    total = 0
    batch = 1
    for layer in getattr(cache, "layers", []):
        if hasattr(layer, "nbytes"):  # quantized layers count their packed codes and scales
            total += layer.nbytes()
            batch = layer.keys.shape[0]
            continue
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.numel():
                total += t.numel() * t.element_size()
                batch = t.shape[0]
    return [total // batch] * batch
