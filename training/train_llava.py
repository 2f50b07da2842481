"""Train ``tiny-llava-shapes`` on ShapesWorld: ``python -m training.train_llava --out DIR``.

Two stages, deterministic given ``--seed``, resumable (``--resume``) from ``DIR/ckpt.pt``:

A. **Vision tower** with dense per-patch supervision from ShapesWorld's masks: for each of the 12x12
   patches, the colour and shape of the object covering it (or background), whether the object's centre
   point falls in it, and which third of the image (row, column) the patch lies in. Linear heads read the
   layer LLaVA feeds to the projector (-2), so those facts become linearly readable there.
B. **Projector + language model** with the tower frozen, on multi-turn conversations: each image comes
   with several question/answer turns drawn evenly from the task types (POPE existence probes of the three
   splits, colour, shape, count, position, left-of, captions). Loss on answer tokens only.

Data are generated on the fly from train-split seeds (never dev/test); a fixed dev set is scored with
teacher forcing every ``--eval-every`` steps and logged to ``DIR/log.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from training.harness import Budget, adamw, load_checkpoint, lr_at, optimizer_step, save_checkpoint, set_lr
from training.llava_shapes import LlavaShapesConfig, build_model, build_processor
from vlmfast.datasets.shapes import (
    CAPTION_PROMPT,  # the same prompt the evaluation asks
    COLOR_NAMES,
    COLS,
    POPE_SPLITS,
    QUESTION_TYPES,
    ROWS,
    SHAPE_PLURALS,
    SHAPES,
    caption,
    generate_scene,
    pope_items,
    split_seeds,
    vqa_items,
)
from vlmfast.datasets.shapes.scene import MAX_OBJECTS
from vlmfast.datasets.shapes.vocab import article

TASKS = ("pope", *QUESTION_TYPES, "caption")
#: training-only warm-up questions that need one attribute matched against the image (no binding yet)
EXTRA_TASKS = ("exists_attr",)


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 2
    vision_steps: int = 2000
    vision_batch: int = 32
    vision_lr: float = 1e-3
    fg_weight: float = 2.0  # extra weight of the object patches' colour / shape losses in stage A
    lm_steps: int = 2800
    lm_batch: int = 16
    turns: int = 8
    lm_lr: float = 6e-4
    warmup: int = 200
    weight_decay: float = 0.01
    turn_weighting: int = 1  # 1: every answer turn weighs the same in the loss; 0: every answer token does
    grounding_weight: float = 0.5  # auxiliary patch-feature / word-embedding alignment (0 disables)
    ground_position: int = 1  # 1: the alignment target also holds the object's cell words ("top", "left")
    embed_std: float = 1.0  # init std of the word embeddings (see Trainer.init_language_side)
    attn_weight: float = 1.0  # attention supervision (see Trainer.attention_loss); 0 disables
    attn_heads: str = "word=0:0;prev=0:1;phrase=1:0;route=2:1;answer=2:0,3:0;pair_a=2:0;pair_b=3:0"
    """which heads are supervised, by role: ``word`` (each colour/shape word of a question -> the objects with
    that attribute), ``phrase`` (the last word of "<colour> <shape>" / "<colour> object" -> the objects it
    names), ``answer`` (the position that predicts the answer -> the question's target objects); and two text
    hops: ``prev`` (a phrase's last word -> the colour word before it) and ``route`` (the answer position ->
    the question's phrase-final words); ``pair_a`` / ``pair_b``: for "is A left of B", one answer head on A and
    one on B instead of ``answer`` on both (so the answer position can compare their positions)."""
    tasks: str = "all"  # comma-separated subset of TASKS to train on, or "all"; overridden by curriculum
    curriculum: str = "0:all;500:exists_attr,pope,color,shape;1000:all,exists_attr"
    """stage-B task schedule "step:tasks;step:tasks" ("all" = every task of TASKS); empty = use ``tasks``.
    Binding an attribute in the question to the image is what the model learns last; a phase of existence
    questions (single attribute, then colour+shape) is what got it there (see the model card)."""
    eval_every: int = 200
    ckpt_every: int = 100
    dev_items: int = 60  # per task type
    model: LlavaShapesConfig = field(default_factory=LlavaShapesConfig)


# ----------------------------------------------------------------------------------------------- data
def patch_cover(scene, grid: int) -> np.ndarray:
    """(objects, grid, grid): the fraction of each patch that each object's visible mask covers."""
    p = scene.size // grid
    return np.stack([o.mask[: p * grid, : p * grid].reshape(grid, p, grid, p).mean((1, 3)) for o in scene.objects])


def patch_targets(scene, grid: int) -> dict[str, np.ndarray]:
    """Per-patch labels (grid x grid), 0 = background. Patch-level: colour/shape of the majority object,
    centre flag, row and column third of the patch. Object-level (the same on every patch of an object): the
    3x3 cell of the object's centroid, its x-centre in ``grid`` bins, how many objects share its shape and
    its colour; and, on every patch, how many objects the image holds. The object-level facts are what
    questions ask about, so the language model only has to find the object's patches and read them."""
    cover = patch_cover(scene, grid)
    objs = scene.objects
    owner = np.where(cover.max(0) > 0.3, cover.argmax(0), -1)  # an object must cover >= 30% of a patch
    p = scene.size // grid
    n_shape = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    n_color = {c: sum(o.color == c for o in objs) for c in COLOR_NAMES}

    def per_object(values) -> np.ndarray:
        table = np.array([0, *values], np.int64)
        return table[owner + 1]

    centre = np.zeros((grid, grid), np.int64)
    for o in objs:
        ys, xs = np.nonzero(o.mask)
        cx, cy = o.center
        k = np.argmin((xs - cx) ** 2 + (ys - cy) ** 2)  # nearest visible pixel to the centroid
        centre[min(grid - 1, ys[k] // p), min(grid - 1, xs[k] // p)] = 1
    idx = np.arange(grid) * 3 // grid
    return {"color": per_object([COLOR_NAMES.index(o.color) + 1 for o in objs]),
            "shape": per_object([SHAPES.index(o.shape) + 1 for o in objs]),
            "centre": centre,
            "row": np.repeat(idx[:, None], grid, 1), "col": np.repeat(idx[None, :], grid, 0),
            "obj_row": per_object([ROWS.index(o.cell[0]) + 1 for o in objs]),
            "obj_col": per_object([COLS.index(o.cell[1]) + 1 for o in objs]),
            "obj_x": per_object([min(grid - 1, int(o.center[0] * grid / scene.size)) + 1 for o in objs]),
            "n_shape": per_object([n_shape[o.shape] for o in objs]),
            "n_color": per_object([n_color[o.color] for o in objs]),
            "n_all": np.full((grid, grid), len(objs), np.int64)}


FG_HEADS = ("color", "shape", "n_shape")  # heads whose object-patch loss is added again with ``fg_weight``
HEADS = {"color": 1 + len(COLOR_NAMES), "shape": 1 + len(SHAPES), "centre": 2, "row": 3, "col": 3,
         "obj_row": 4, "obj_col": 4, "obj_x": 1 + LlavaShapesConfig().grid, "n_shape": 1 + MAX_OBJECTS,
         "n_color": 1 + MAX_OBJECTS, "n_all": 1 + MAX_OBJECTS}


def qa_pool(scene, rng: np.random.Generator) -> dict[str, list[tuple[str, str, tuple[int, ...]]]]:
    """Training questions per task type as (question, answer, target objects); the targets (indices into
    ``scene.objects``, empty when the question names nothing present) drive the attention supervision."""
    pool: dict[str, list] = {t: [] for t in TASKS}
    objs = scene.objects
    for it in vqa_items(scene):
        pool[it.type].append((it.question, it.answer, it.targets))
    split = POPE_SPLITS[int(rng.integers(len(POPE_SPLITS)))]
    pool["pope"] = [(it.question, it.answer, tuple(i for i, o in enumerate(objs)
                                                   if (o.color, o.shape) == (it.color, it.shape)))
                    for it in pope_items(scene, split)]
    pool["caption"] = [(CAPTION_PROMPT, caption(scene), ())]
    attr = [(f"is there {article(c)} {c} object in the image ?", tuple(i for i, o in enumerate(objs) if o.color == c))
            for c in COLOR_NAMES]
    attr += [(f"is there {article(sh)} {sh} in the image ?", tuple(i for i, o in enumerate(objs) if o.shape == sh))
             for sh in SHAPES]
    yes = [(q, "yes", tg) for q, tg in attr if tg]
    no = [(q, "no", tg) for q, tg in attr if not tg]
    k = min(len(yes), len(no))
    pool["exists_attr"] = ([yes[i] for i in rng.permutation(len(yes))[:k]]
                           + [no[i] for i in rng.permutation(len(no))[:k]])
    return {t: v for t, v in pool.items() if v}


TEXT_ROLES = ("prev", "route")  # supervised roles whose targets are token positions, not image patches
#: optional roles for "is A left of B": one head on A, one on B (instead of ``answer`` averaging both), so the
#: answer position gets each object's position from its own head and can compare them
PAIR_ROLES = ("pair_a", "pair_b")
_PLURAL_TO_SHAPE = {v: k for k, v in SHAPE_PLURALS.items()}


def word_targets(words: list[str], scene) -> list[tuple[str, int, tuple[int, ...]]]:
    """Attention targets of a question's words: ("word", j, objects with word j's colour or shape) for every
    colour / shape word, and ("phrase", j, objects named by the phrase ending at j) for "<colour> <shape>",
    "<colour> object(s)" and a bare shape."""
    objs, out = scene.objects, []
    for j, w in enumerate(words):
        shape = w if w in SHAPES else _PLURAL_TO_SHAPE.get(w)
        color = words[j - 1] if j and words[j - 1] in COLOR_NAMES else None
        if w in COLOR_NAMES:
            out.append(("word", j, tuple(i for i, o in enumerate(objs) if o.color == w)))
        if shape:
            out.append(("word", j, tuple(i for i, o in enumerate(objs) if o.shape == shape)))
            out.append(("phrase", j, tuple(i for i, o in enumerate(objs)
                                           if o.shape == shape and color in (None, o.color))))
        elif w in ("object", "objects") and color:
            out.append(("phrase", j, tuple(i for i, o in enumerate(objs) if o.color == color)))
    return out


def parse_heads(spec: str) -> dict[str, list[tuple[int, int]]]:
    """ "word=0:0;answer=2:0,3:0" -> {"word": [(0, 0)], "answer": [(2, 0), (3, 0)]}."""
    out = {}
    for part in filter(None, spec.split(";")):
        role, _, heads = part.partition("=")
        if role not in ("word", "phrase", "answer", *PAIR_ROLES, *TEXT_ROLES):
            raise ValueError(f"attn_heads: unknown role {role!r}; expected word, phrase, answer, pair_a, pair_b, "
                             "prev or route")
        out[role] = [tuple(map(int, h.split(":"))) for h in heads.split(",") if h]
    return out


def attention_target(cover: np.ndarray, targets: tuple[int, ...]) -> np.ndarray | None:
    """Where the answer's attention should go: each target object's patches weighted by coverage, every
    object weighing the same; None when the question is about nothing present."""
    if not targets:
        return None
    t = sum(cover[i].ravel() / max(cover[i].sum(), 1e-6) for i in targets)
    return t / t.sum()


class Encoder:
    """Builds token ids in the exact layout the processor + chat template produce at inference."""

    def __init__(self, processor, grid: int):
        self.tok = processor.tokenizer
        self.vocab = self.tok.get_vocab()
        self.image = [self.vocab["<image>"]] * (grid * grid)
        self.eos = self.vocab["</s>"]
        self.user = self.ids("USER :")
        self.assistant = self.ids("ASSISTANT :")

    def ids(self, text: str) -> list[int]:
        return [self.vocab[w] for w in text.split()]

    def conversation(self, turns) -> tuple[list[int], list[int], list[int]]:
        """Token ids, labels (answers only) and, per turn, the position that predicts the answer's first
        token. ``turns`` holds (question, answer, ...) tuples; extra fields are ignored."""
        ids, labels = list(self.user) + self.image, [-100] * (len(self.user) + len(self.image))
        where = []
        for k, (q, a, *_) in enumerate(turns):
            prefix = (self.user if k else []) + self.ids(q) + self.assistant
            answer = self.ids(a) + [self.eos]
            ids += prefix
            where.append(len(ids) - 1)
            ids += answer
            labels += [-100] * len(prefix) + answer
        return ids, labels, where

    @staticmethod
    def turn_weights(labels: list[int]) -> list[float]:
        """1/len(answer) on each answer's tokens, so every turn weighs the same in the loss (a 15-token
        caption must not drown the one-word answers that teach the model to look)."""
        w, run = [0.0] * len(labels), []
        for i, lab in enumerate(labels + [-100]):
            if lab != -100:
                run.append(i)
            elif run:
                for j in run:
                    w[j] = 1.0 / len(run)
                run = []
        return w


def pad_batch(seqs: list[list[int]], value: int) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (n - len(s)) for s in seqs])


# ----------------------------------------------------------------------------------------------- training
class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.processor = build_processor(cfg.model)
        self.model = build_model(cfg.model, seed=cfg.seed)
        self.training_attn, self._attn = False, None
        self.sup_heads = parse_heads(cfg.attn_heads) if cfg.attn_weight else {}
        self.init_language_side()
        self.enc = Encoder(self.processor, cfg.model.grid)
        d = cfg.model.vision_hidden
        torch.manual_seed(cfg.seed + 1)
        self.heads = torch.nn.ModuleDict({k: torch.nn.Linear(d, n) for k, n in HEADS.items()})
        self.stage, self.step = "vision", 0
        self.opt = self._optimizer()
        self.history: list[dict] = []
        self.dev = self._dev_set()

    def init_language_side(self):
        """Word embeddings at std ``embed_std`` (transformers' default 0.02 gives norms ~0.3, so after the first
        layer's updates the question's words are drowned and the model learns only answer priors; the
        projected image features have norms ~15). Embeddings and norms get no weight decay."""
        torch.manual_seed(self.cfg.seed + 2)
        torch.nn.init.normal_(self.model.get_input_embeddings().weight, std=self.cfg.embed_std)
        if self.sup_heads:  # attention supervision needs the weights: eager attention while training
            self.model.set_attn_implementation("eager")

    def restart_language_side(self):
        """Keep the trained vision tower; re-initialise projector and language model; stage B from step 0."""
        fresh = build_model(self.cfg.model, seed=self.cfg.seed)
        tower = self.model.model.vision_tower.state_dict()
        self.model = fresh
        self.model.model.vision_tower.load_state_dict(tower)
        self.init_language_side()
        self.model.model.vision_tower.requires_grad_(False)
        self.stage, self.step = "lm", 0
        self.opt = self._optimizer()

    def _optimizer(self):
        if self.stage == "vision":
            params = list(self.model.model.vision_tower.parameters()) + list(self.heads.parameters())
            lr = self.cfg.vision_lr
        else:
            return adamw(((n, p) for n, p in self.model.named_parameters() if "vision_tower" not in n),
                         lr=self.cfg.lm_lr, weight_decay=self.cfg.weight_decay, betas=(0.9, 0.98),
                         decays=lambda n, p: p.dim() > 1 and "embed_tokens" not in n)
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=self.cfg.weight_decay)

    def pixels(self, scenes) -> torch.Tensor:
        return self.processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]

    def scenes(self, step: int, batch: int, stream: int):
        start = (stream * 1_000_000 + step * batch) % (10_000_000 - batch)
        return [generate_scene(s) for s in split_seeds("train", batch, start=start)]

    # -- stage A
    def vision_step(self) -> dict:
        cfg = self.cfg
        scenes = self.scenes(self.step, cfg.vision_batch, stream=0)
        px = self.pixels(scenes)
        targets = [patch_targets(s, cfg.model.grid) for s in scenes]
        hs = self.model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        fg = torch.from_numpy(np.stack([t["color"] for t in targets]).reshape(len(scenes), -1)) > 0
        loss, acc = 0.0, {}
        for k, head in self.heads.items():
            y = torch.from_numpy(np.stack([t[k] for t in targets]).reshape(len(scenes), -1))
            logits = head(hs)
            loss = loss + F.cross_entropy(logits.flatten(0, 1), y.flatten())
            acc[k] = float((logits.argmax(-1) == y).float().mean())
            if k in FG_HEADS:  # object patches are few and shape is what is hard to see: weigh them extra
                loss = loss + cfg.fg_weight * F.cross_entropy(logits[fg], y[fg])
                acc[k + "_fg"] = float((logits.argmax(-1)[fg] == y[fg]).float().mean())
        return {"loss": loss, **{f"acc_{k}": v for k, v in acc.items()}}

    # -- stage B
    def lm_batch(self, step: int, batch: int, turns: int):
        scenes = self.scenes(step, batch, stream=1)
        rng = np.random.default_rng((self.cfg.seed, step))
        seqs, labels = [], []
        sup: dict[str, list] = {role: [] for role in self.sup_heads}  # role -> (batch row, position, target)
        wanted = self.tasks_at(step)
        for b, s in enumerate(scenes):
            pool = {t: v for t, v in qa_pool(s, rng).items() if t in wanted}
            types = list(pool)
            chosen = []
            for _ in range(turns):
                t = types[int(rng.integers(len(types)))]
                chosen.append(pool[t][int(rng.integers(len(pool[t])))])
            ids, lab, where = self.enc.conversation(chosen)
            cover = patch_cover(s, self.cfg.model.grid)
            for pos, (q, a, tg) in zip(where, chosen):
                words = q.split()
                first = pos - len(self.enc.assistant) - len(words) + 1  # position of the question's first word
                per_word = word_targets(words, s)
                # every position that predicts an answer word reads the targets: "top" then "left" of a
                # position answer both come from the object (supervising only the first left the column at
                # its prior, "center"); captions have no targets, so nothing is added for them
                pair = "pair_a" in sup and " left of the " in q and len(tg) == 2
                found = ([("pair_a", pos, tg[:1]), ("pair_b", pos, tg[1:])] if pair
                         else [("answer", pos + j, tg) for j in range(len(a.split()))])
                found += [(role, first + j, objs) for role, j, objs in per_word]
                for role, at, objs in found:
                    target = attention_target(cover, objs)
                    if role in sup and target is not None:
                        sup[role].append((b, at, target))
                # text hops: a phrase's last word reads the colour before it; the answer reads the phrase words
                phrase_ends = sorted({first + j for role, j, _ in per_word if role == "phrase"})
                if "route" in sup and phrase_ends:
                    sup["route"] += [(b, pos + j, tuple(phrase_ends)) for j in range(len(a.split()) if tg else 1)]
                if "prev" in sup:
                    sup["prev"] += [(b, at, (at - 1,)) for at in phrase_ends if words[at - first - 1] in COLOR_NAMES]
            seqs.append(ids)
            labels.append(lab)
        return scenes, seqs, labels, sup

    def lm_forward(self, px, seqs, labels):
        model = self.model
        pad = self.enc.vocab["<pad>"]
        ids = pad_batch(seqs, pad)
        lab = pad_batch(labels, -100)
        mask = pad_batch([[1] * len(s) for s in seqs], 0)
        with torch.no_grad():
            hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states[-2][:, 1:]
        feats = model.model.multi_modal_projector(hs)
        embeds = model.get_input_embeddings()(ids)
        image_mask = (ids == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(image_mask, feats.reshape(-1, feats.shape[-1]).to(embeds.dtype))
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=mask,
                                         output_attentions=bool(self.training_attn))
        logits = model.lm_head(out.last_hidden_state)
        self._feats, self._attn = feats, out.attentions
        return logits, lab

    def grounding_loss(self, scenes) -> torch.Tensor:
        """Auxiliary alignment: each foreground patch's projected feature should point where the sum of its
        colour word's and shape word's embeddings points (cosine). It gives the language model image tokens it
        can match against the question's words from the first steps on; the embeddings themselves are only
        trained by the language-modelling loss (the target is detached)."""
        emb = self.model.get_input_embeddings().weight
        words = self.enc.vocab
        color_ids = torch.tensor([words[c] for c in COLOR_NAMES])
        shape_ids = torch.tensor([words[s] for s in SHAPES])
        t = [patch_targets(s, self.cfg.model.grid) for s in scenes]

        def labels(name: str) -> torch.Tensor:  # (scenes, patches)
            return torch.from_numpy(np.stack([x[name] for x in t]).reshape(len(scenes), -1))

        col, shp = labels("color"), labels("shape")
        fg = (col > 0) & (shp > 0)
        if not bool(fg.any()):
            return self._feats.sum() * 0
        target = emb[color_ids[col[fg] - 1]] + emb[shape_ids[shp[fg] - 1]]
        if self.cfg.ground_position:  # the cell the position question asks for, as its two answer words
            row_ids, col_ids = torch.tensor([words[r] for r in ROWS]), torch.tensor([words[c] for c in COLS])
            target = target + emb[row_ids[labels("obj_row")[fg] - 1]] + emb[col_ids[labels("obj_col")[fg] - 1]]
        target = target.detach()
        return (1 - F.cosine_similarity(self._feats[fg], target, dim=-1)).mean()

    def attention_loss(self, sup: dict[str, list]) -> torch.Tensor:
        """Attention supervision: at the position that predicts each answer, the chosen heads' attention
        should fall on the patches of the objects the question is about (cross-entropy of the attention
        weights against the coverage-weighted target patches). Binding a question word to image tokens is
        what the language loss alone taught slowest (see the model card); this teaches it directly."""
        start, losses = len(self.enc.user), []
        for role, items in sup.items():
            if not items:
                continue
            rows = torch.tensor([b for b, _, _ in items])
            pos = torch.tensor([q for _, q, _ in items])
            if role in TEXT_ROLES:  # targets are token positions: uniform over them
                width = max(len(t) for _, _, t in items)
                keys = torch.tensor([list(t) + [t[0]] * (width - len(t)) for _, _, t in items])
                weight = torch.tensor([[1.0 / len(t)] * len(t) + [0.0] * (width - len(t)) for _, _, t in items])
            for layer, head in self.sup_heads[role]:
                if role in TEXT_ROLES:
                    a = self._attn[layer][rows, head, pos][torch.arange(len(items))[:, None], keys]
                    losses.append(-(weight * torch.log(a + 1e-6)).sum(-1).mean())
                    continue
                target = torch.from_numpy(np.stack([t for _, _, t in items])).float()
                a = self._attn[layer][rows, head, pos, start:start + target.shape[1]]
                losses.append(-(target * torch.log(a + 1e-6)).sum(-1).mean())
        return torch.stack(losses).mean()

    def lm_step(self) -> dict:
        scenes, seqs, labels, sup = self.lm_batch(self.step, self.cfg.lm_batch, self.cfg.turns)
        self.training_attn = bool(self.cfg.attn_weight and any(sup.values()))
        logits, lab = self.lm_forward(self.pixels(scenes), seqs, labels)
        self.training_attn = False
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), lab[:, 1:].flatten(), ignore_index=-100, reduction="none")
        if self.cfg.turn_weighting:
            w = torch.tensor([x + [0.0] * (lab.shape[1] - len(x)) for x in map(Encoder.turn_weights, labels)])
            loss = (ce * w[:, 1:].flatten()).sum() / w.sum()
        else:
            loss = ce.sum() / (lab[:, 1:] != -100).sum()
        out = {"loss": loss, "lm_loss": loss.detach()}
        if self.cfg.grounding_weight:
            aux = self.grounding_loss(scenes)
            out["loss"] = out["loss"] + self.cfg.grounding_weight * aux
            out["aux"] = aux.detach()
        if self._attn is not None:
            att = self.attention_loss(sup)
            out["loss"] = out["loss"] + self.cfg.attn_weight * att
            out["attn"] = att.detach()
        return out

    def tasks_at(self, step: int) -> tuple[str, ...]:
        spec = self.cfg.tasks
        for part in filter(None, self.cfg.curriculum.split(";")):
            start, names = part.split(":")
            if step >= int(start):
                spec = names
        out: list[str] = []
        for name in spec.split(","):
            out += list(TASKS) if name == "all" else [name]
        unknown = set(out) - set(TASKS + EXTRA_TASKS)
        if unknown:
            raise ValueError(f"unknown training task(s) {sorted(unknown)}; expected {TASKS + EXTRA_TASKS} or 'all'")
        return tuple(out)

    def _dev_set(self):
        items = {t: [] for t in TASKS + EXTRA_TASKS}
        seeds = split_seeds("dev", 400)
        rng = np.random.default_rng(12345)
        for seed in seeds:
            s = generate_scene(seed)
            for t, qs in qa_pool(s, rng).items():
                if len(items[t]) < self.cfg.dev_items:
                    items[t].append((s, qs[int(rng.integers(len(qs)))]))
            if all(len(v) >= self.cfg.dev_items for v in items.values()):
                break
        return items

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Teacher-forced exact match of whole answers on the fixed dev set, per task type."""
        self.model.eval()
        res = {}
        for t, items in self.dev.items():
            hits = 0
            for i in range(0, len(items), 32):
                chunk = items[i:i + 32]
                seqs, labels, _ = zip(*(self.enc.conversation([qa]) for _, qa in chunk))
                logits, lab = self.lm_forward(self.pixels([s for s, _ in chunk]), list(seqs), list(labels))
                pred = logits[:, :-1].argmax(-1)
                tgt = lab[:, 1:]
                ok = ((pred == tgt) | (tgt == -100)).all(1)
                hits += int(ok.sum())
            res[t] = hits / len(items)
        res["mean"] = float(np.mean([res[t] for t in TASKS]))
        self.model.train()
        return res

    # -- loop, checkpoints
    def save(self):
        save_checkpoint(self.out / "ckpt.pt", {
            "stage": self.stage, "step": self.step, "model": self.model.state_dict(), "heads": self.heads.state_dict(),
            "opt": self.opt.state_dict(), "rng": torch.get_rng_state(), "history": self.history,
            "config": asdict(self.cfg)})

    def load(self, model_only: bool = False):
        """Resume from ``ckpt.pt``; ``model_only``: the weights, stage, step and history but a fresh optimizer
        and RNG state."""
        ck = load_checkpoint(self.out / "ckpt.pt")
        self.model.load_state_dict(ck["model"])
        self.heads.load_state_dict(ck["heads"])
        self.stage, self.step, self.history = ck["stage"], ck["step"], ck["history"]
        self.opt = self._optimizer()
        if not model_only:
            self.opt.load_state_dict(ck["opt"])
            torch.set_rng_state(ck["rng"])

    def log(self, row: dict):
        self.history.append(row)
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def run(self, max_minutes: float | None = None):
        budget = Budget(max_minutes)
        self.model.train()
        for stage, total, base in (("vision", self.cfg.vision_steps, self.cfg.vision_lr),
                                   ("lm", self.cfg.lm_steps, self.cfg.lm_lr)):
            if stage == "vision" and self.stage == "lm":
                continue  # resumed after stage A
            bar = tqdm(total=total, initial=self.step, desc=f"stage {stage}")
            while self.step < total:
                set_lr(self.opt, lr_at(self.step, total, base, self.cfg.warmup, final_frac=0.1))
                m = self.vision_step() if stage == "vision" else self.lm_step()
                optimizer_step(self.opt, m["loss"], [p for g in self.opt.param_groups for p in g["params"]], 1.0)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(m['loss'].detach()):.3f}")
                row = {"stage": stage, "step": self.step, "time_s": round(budget.seconds(), 1),
                       **{k: round(float(v.detach() if torch.is_tensor(v) else v), 4) for k, v in m.items()}}
                if stage == "lm" and self.step % self.cfg.eval_every == 0:
                    row["dev"] = self.evaluate()
                    tqdm.write(f"step {self.step}: dev {json.dumps(row['dev'])}")
                if self.step % 25 == 0 or "dev" in row:
                    self.log(row)
                if self.step % self.cfg.ckpt_every == 0:
                    self.save()
                if budget.spent():
                    self.save()
                    bar.close()
                    return False
            bar.close()
            if stage == "vision":
                self.stage, self.step = "lm", 0
                self.opt = self._optimizer()
                self.model.model.vision_tower.requires_grad_(False)
                self.save()
        self.save()
        return True

    def export(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self.model.eval()
        self.model.set_attn_implementation("sdpa")  # eager was for training only
        self.model.save_pretrained(path)
        self.processor.save_pretrained(path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--minutes", type=float, default=None, help="stop (with a checkpoint) after this long")
    p.add_argument("--export", type=Path, default=None, help="save the final model here (save_pretrained)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue stage B from exported weights (a save_pretrained folder, e.g. the shipped model)")
    p.add_argument("--start-step", type=int, default=0, help="with --init-from: the stage-B step it had reached")
    p.add_argument("--retrain-vision", action="store_true",
                   help="with --resume: train the vision tower again (--vision-steps more steps, fresh optimiser), "
                        "then continue the language side from its current weights for --lm-steps")
    p.add_argument("--restart-lm", action="store_true",
                   help="with --resume: keep the trained vision tower, start stage B (language side) afresh")
    for f in ("vision_steps", "lm_steps", "lm_batch", "vision_batch", "turns", "eval_every", "ckpt_every",
              "threads", "dev_items", "warmup", "turn_weighting", "ground_position"):
        p.add_argument("--" + f.replace("_", "-"), type=int, default=None)
    for f in ("lm_lr", "vision_lr", "grounding_weight", "embed_std", "attn_weight", "fg_weight"):
        p.add_argument("--" + f.replace("_", "-"), type=float, default=None)
    p.add_argument("--attn-heads", default=None,
                   help="supervised heads by role, e.g. word=0:0;phrase=1:0;answer=2:0,3:0")
    p.add_argument("--curriculum", default=None, help='stage-B schedule "step:tasks;..." ("" = use --tasks)')
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(TASKS + EXTRA_TASKS)} "
                                                 "(default: all of " + ",".join(TASKS) + ")")
    a = p.parse_args(argv)
    cfg = TrainConfig(seed=a.seed, **{k: v for k, v in vars(a).items()
                                       if k in TrainConfig.__dataclass_fields__ and k != "seed" and v is not None})
    a.out.mkdir(parents=True, exist_ok=True)
    tr = Trainer(cfg, a.out)
    if a.init_from is not None:
        from transformers import LlavaForConditionalGeneration

        state = LlavaForConditionalGeneration.from_pretrained(a.init_from, dtype=torch.float32).state_dict()
        missing, unexpected = tr.model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"--init-from {a.init_from}: weights do not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        tr.model.model.vision_tower.requires_grad_(False)
        tr.stage, tr.step = "lm", a.start_step
        tr.opt = tr._optimizer()  # fresh AdamW moments; the warm-up is not repeated
    elif a.resume and not (a.out / "ckpt.pt").is_file():
        print(f"--resume: no checkpoint at {a.out / 'ckpt.pt'} (run without --resume to start)", file=sys.stderr)
        raise SystemExit(2)
    elif a.resume:
        tr.load(model_only=a.restart_lm or a.retrain_vision)
        if tr.stage == "lm":
            tr.model.model.vision_tower.requires_grad_(False)
        if a.restart_lm:
            tr.restart_language_side()
        if a.retrain_vision:
            tr.model.model.vision_tower.requires_grad_(True)
            tr.stage, tr.step = "vision", 0
            tr.opt = tr._optimizer()
    done = tr.run(a.minutes)
    if done and a.export:
        tr.export(a.export)
    print(json.dumps({"done": done, "stage": tr.stage, "step": tr.step}))


if __name__ == "__main__":
    main()
