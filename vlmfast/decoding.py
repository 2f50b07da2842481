"""The decode loop: greedy or sampling with transformers' own logits processors and warpers; teacher-forced
scoring through the same path. Positions continue from the original (unpruned) maximum + 1; with decode branches
(DAMRO, AGLA) each token is chosen from the combined logits and fed to every branch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError
from .request import decode_step, next_positions
from .stats import now


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


def decode(model, adapter, logits: torch.Tensor, cache, prompt_ids: torch.Tensor, mask: torch.Tensor,
           positions: torch.Tensor, valid: torch.Tensor, args: GenerationArgs,
           branches=None) -> tuple[list[list[int]], int, float]:
    """Greedy / sampled decoding from the prefill's last logits: (token ids per row without EOS, decode steps run,
    decode seconds)."""
    cfg = model.generation_config
    eos = cfg.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else (eos or []), device=logits.device)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else (int(eos[0]) if eos.numel() else 0)
    chooser = TokenChooser(args, logits.device)
    next_pos = next_positions(positions, valid)  # (R, B, 1)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    history = prompt_ids
    generated = []
    n_steps, t0 = 0, now(logits.device)
    for step in range(args.max_new_tokens):
        tok = chooser(history, logits if branches is None else branches.combine(logits))
        tok = torch.where(finished, torch.full_like(tok, pad), tok)
        generated.append(tok)
        history = torch.cat([history, tok[:, None]], 1)
        if eos.numel():
            finished |= torch.isin(tok, eos)
        if bool(finished.all()) or step == args.max_new_tokens - 1:
            break
        logits, mask, next_pos = decode_step(model, adapter, tok, cache, mask, next_pos)
        if branches is not None:
            branches.step(tok)
        n_steps += 1
    t_dec = now(logits.device) - t0
    gen = torch.stack(generated, 1)
    stop = set(eos.tolist())
    tokens = []
    for row in gen.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        tokens.append(row[:cut])
    return tokens, n_steps, t_dec


def score(model, adapter, logits: torch.Tensor, cache, mask: torch.Tensor, positions: torch.Tensor,
          valid: torch.Tensor, forced: list[list[int]], branches=None) -> list[tuple[float, bool]]:
    """Teacher-force ``forced`` through the decode path; per row, the sum of its log-probabilities and whether
    greedy decoding would have produced it. With ``branches`` the distribution is softmax of the combined logits
    (tokens outside the plausible set: -inf)."""
    b = logits.shape[0]
    width = max(len(f) for f in forced)
    pad = model.generation_config.pad_token_id or 0
    tokens = torch.tensor([f + [pad] * (width - len(f)) for f in forced], device=logits.device)
    live = torch.tensor([[t < len(f) for t in range(width)] for f in forced], device=logits.device)
    logp = torch.zeros(b, dtype=torch.float64, device=logits.device)
    greedy = torch.ones(b, dtype=torch.bool, device=logits.device)
    next_pos = next_positions(positions, valid)
    for t in range(width):
        tok = tokens[:, t]
        z = logits if branches is None else branches.combine(logits)
        lp = z.log_softmax(-1).gather(1, tok[:, None])[:, 0]
        logp += torch.where(live[:, t], lp.double(), torch.zeros_like(logp))
        greedy &= ~live[:, t] | (z.argmax(-1) == tok)
        if t == width - 1:
            break
        logits, mask, next_pos = decode_step(model, adapter, tok, cache, mask, next_pos)
        if branches is not None:
            branches.step(tok)
    return [(float(logp[i]), bool(greedy[i])) for i in range(b)]
