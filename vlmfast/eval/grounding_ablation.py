"""Which attention grounds best on a model: pointing accuracy of map variants on ShapesWorld referring
expressions (no SAM; the map's peak must land on the target). Use it to choose a policy's ``grounding``
section (``prompt_rows``, ``layers``, ``head_weights``, ``flow``) on the dev split.

    python -m vlmfast.eval.grounding_ablation --model tiny-llava-shapes --split dev --limit 20

Each request is generated once with ``ground=True``; the captured attention is then re-mapped under every
variant: query rows (the phrase's tokens, the answer position, both) x layers (each one alone, all) x
propagation (direct, rollout, regularised flow), for the head weighting the capture used (one run per
weighting).
"""

from __future__ import annotations

import argparse
import itertools
import json
from dataclasses import replace

import numpy as np

from ..datasets.shapes import iter_scenes, referring_expressions
from ..grounding import GroundingConfig
from ..grounding.pipeline import PhraseRows, phrase_maps
from .grounding import PROMPT, phrase_of


class _NoSam:
    """Stands in for SAM: the ablation scores maps only."""

    def set_image(self, image):
        self.shape = image.shape[:2]

    def predict(self, **kw):
        return np.zeros((1, *self.shape), bool), np.zeros(1), np.zeros((1, 4, 4))


def ablate(acc, scenes, weightings=("mean", "mean-max")) -> list[dict]:
    model_layers = len(acc.adapter.decoder_layers)
    acc.grounder.predictor = _NoSam()
    rows: dict[tuple, list[bool]] = {}
    for hw in weightings:
        # flow="regularised" makes the capture record every query row (the flows need them)
        base = GroundingConfig(head_weights=hw, flow="regularised", prompt_rows="phrase", answer_objects=False)
        acc.grounder.cfg = base
        for s in scenes:
            for r in referring_expressions(s):
                acc.generate(images=[s.image], prompt=PROMPT.format(expression=r.expression), max_new_tokens=1,
                             ground=True, ground_phrases=[phrase_of(r.expression)])
                req = acc.grounder.last_request
                (reqs, ctx), cap = req.samples[0], req.capture
                last = ctx.valid.shape[1] - 1
                sets = {"phrase": reqs[0].rows, "answer": [last], "phrase+answer": sorted(set(reqs[0].rows) | {last})}
                layer_sets = {f"L{k}": [k] for k in range(model_layers)} | {"all": None}
                for (rn, rws), (ln, layers), flow in itertools.product(sets.items(), layer_sets.items(),
                                                                       ("none", "rollout", "regularised")):
                    if layers is not None and flow != "none":
                        continue  # one layer: the flows equal direct attention up to the identity
                    cfg = replace(base, layers=layers, flow=flow)
                    (i, heat), = phrase_maps(cap, cfg, [PhraseRows("x", rws)], ctx)
                    y, x = np.unravel_index(int(heat.argmax()), heat.shape)
                    rows.setdefault((hw, rn, ln, flow), []).append(bool(r.mask[y, x]))
    return sorted(({"head_weights": k[0], "prompt_rows": k[1], "layers": k[2], "flow": k[3],
                    "pointing": float(np.mean(v)), "n": len(v)} for k, v in rows.items()),
                  key=lambda d: -d["pointing"])


def main(argv=None) -> int:
    from ..accelerator import VLMAccelerator

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-llava-shapes")
    p.add_argument("--split", default="dev", choices=["train", "dev"],
                   help="an ablation chooses, so it reads dev (or train), never test or final")
    p.add_argument("--limit", type=int, default=20, help="scenes")
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", help="write all rows here")
    a = p.parse_args(argv)
    acc = VLMAccelerator.from_pretrained(a.model, policy=None)
    res = ablate(acc, list(iter_scenes(a.split, a.limit)))
    for d in res[: a.top]:
        print(f"{d['pointing']:.3f}  head_weights={d['head_weights']:<9} prompt_rows={d['prompt_rows']:<13} "
              f"layers={d['layers']:<4} flow={d['flow']}  (n={d['n']})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
