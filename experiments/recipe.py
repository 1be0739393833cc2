"""python -m experiments.recipe: the LLaVA / Bonsai Phase I recipe end to end, in miniature.

Pretrained parts -> assemble -> align the projector -> QLoRA instruction tuning -> fuse -> 4-bit, on the
built-in shapes task (bonsai_mlx.core.synthetic), with a from-scratch `--stage full` run on the same data at
equal optimizer steps x batch beside it. Stages, each in its own directory under --out, logged to
logs/<stage>.log and recorded in stages.json once finished (a rerun skips finished stages; a stage cut short is
cleared and run again):

  data         question records, caption records ("Describe the image.") and a held-out set of both
  scratch      `convert init --tiny --data`: the from-scratch tiny Pico of the baseline; its tokenizer (the
               project's tiny BPE builder, trained on the task's text) is the one every part shares, and its
               shapes are the parts' shapes
  lm           (a) a Qwen2ForCausalLM pretrained on the task's text (captions and QA, chat format, no image,
               plus "a scene's caption, then a question about it"): the stand-in for Qwen2.5-Instruct
  siglip       (b) a SiglipModel pretrained with SigLIP's own sigmoid image-text loss on image-caption pairs:
               the stand-in for SigLIP
  assemble     (c) `convert init --vision siglip --text lm`
  align        (d) `bonsai_mlx.train --stage align` (projector only) on captions, then `convert fuse`
  instruct     (e) `bonsai_mlx.train --stage instruct --quantize-base 4` (QLoRA) on questions
  fuse         (f) `convert fuse`, then `convert to-mlx --quantize 4`
  scratch-full the baseline: `bonsai_mlx.train --stage full` from scratch on captions + questions
  eval-*       (g) `bonsai_mlx.evaluate` of each stage's model: held-out exact match per question type, and
               the per-token perplexity (`--perplexity`) of held-out reference captions

Why here: (a) and (b) train in PyTorch with transformers' own Qwen2ForCausalLM and SiglipModel (its
`return_loss=True` is SigLIP's sigmoid loss), and torch may not enter bonsai_mlx (tests/test_layers.py). The
CUDA side may import only bonsai_mlx.core, so every MLX step (convert, train, evaluate) runs through the project's
CLIs, as a user would type them, in another process than this PyTorch one: the step runner's worker
(experiments/steps.py) runs them one after another as `python -m` would, so their ~5 s of imports each are paid
once. Pretraining runs in
this process, on CPU (or a GPU when torch sees one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bonsai_mlx.core.cli import add_options, from_args
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.train_config import TrainConfig
from experiments.fit import fit
from experiments.steps import Steps, say

IMAGE = "<image>"
CAPTION = "caption"  # the record type of caption samples (synthetic.sample's)
CONVERT = "bonsai_mlx.convert"  # `bonsai convert`, as an installed user runs it


@dataclass
class Setup:
    out: str = "runs/recipe"
    seed: int = 0
    n_questions: int = 12000  # instruct data (one question per image)
    n_captions: int = 6000  # align data and SigLIP's image-caption pairs
    n_eval: int = 400  # held-out questions
    n_eval_captions: int = 100  # held-out captions (perplexity, exact caption)
    # Part sizes: None = `convert init --tiny`'s defaults. 24 px patches: the embedded default's (its
    # bonsai_mlx.embedded.RECIPE, measured in docs/embedded_task.md): one image token per cell of the task.
    width: int | None = None
    layers: int | None = None
    vision_layers: int | None = None
    patch_size: int | None = 24
    # Pretraining init: the tiny recipe's (bonsai_mlx.tiny.TinyRecipe), not transformers' 0.02, which at width 128
    # leaves attention near uniform: measured (experiments/recipe_diagnose.py), an LM pretrained from 0.02 answered no
    # better with the caption in its context than without, so no projector could make it read an image.
    init_std: float = 0.08
    # (a) the language model (800 steps: at 400 it had only begun to answer from its context)
    lm_steps: int = 800
    lm_batch: int = 32
    lm_lr: float = 1e-3
    lm_grounded: int = 12000  # + text-only records "caption of a scene, question about it" (see grounded_records)
    # (b) the vision tower
    siglip_steps: int = 400
    siglip_batch: int = 64
    siglip_lr: float = 1e-3
    siglip_text_layers: int = 2
    # (d), (e) and the baseline share one batch size
    batch_size: int = 32
    align_steps: int = 400
    align_lr: float = 1e-3  # LLaVA's stage-1 lr; measured over 200 steps: 1e-3 beat 3e-3 and 1e-2
    instruct_steps: int = 400
    # LoRA's rate in (e); the projector trains at 0.1x it (TrainConfig's LLaVA ratio). Measured from the same aligned
    # model, seed 0 (docs/recipe.md, 2026-12-03): 5e-4 gave 68.0% on the questions, 2e-3 48.5% (2e-3 for both
    # the adapters and the projector, before per-component rates: 36.8%)
    instruct_lr: float = 5e-4
    lora_rank: int = 16
    # stage-(e) variants to run from the one aligned model (ARMS); the first is the recipe's (e)
    arms: str = "instruct"
    # seeds to run, each under --out/seed-N, then the mean and spread of every row (--seed is ignored)
    seeds: str | None = None
    eval_batch: int = 32
    eval_max_tokens: int = 32  # a caption is ~25 tokens
    # PyTorch threads for (a) and (b). 1: on the shared 2-core machine a 2-thread step of (a) took 16 s against
    # 3.8 s for 1 thread (load ~7: OpenMP threads spin while others hold the cores); raise it on a quiet machine.
    threads: int = 1


QUICK = dict(
    n_questions=48,
    n_captions=48,
    n_eval=5,
    n_eval_captions=2,
    eval_max_tokens=4,
    width=32,
    layers=1,
    vision_layers=1,
    lm_steps=3,
    lm_batch=8,
    lm_grounded=16,
    siglip_steps=3,
    siglip_batch=8,
    siglip_text_layers=1,
    batch_size=4,
    align_steps=2,
    instruct_steps=2,
)


def _log(msg: str, log: Path | None = None) -> None:
    say("recipe", msg, log)


@dataclass
class Recipe:
    """One run: its settings and its steps (stages.json holds the finished stages, their wall and CPU time)."""

    s: Setup
    steps: Steps

    @property
    def out(self) -> Path:
        return self.steps.root

    @property
    def state(self) -> dict:
        return self.steps.state

    def stage(self, name: str, outputs: list[str], fn: Callable[[Path], dict | None]) -> None:
        """One stage, once; `outputs`: its folders under --out, cleared of what an interrupted try left."""
        self.steps.step(name, fn, clear=[self.out / o for o in outputs])

    def cli(self, log: Path, module: str, *args: str) -> None:
        """One MLX-side command, as `python -m` runs it, in the steps' worker process (never this PyTorch one)."""
        self.steps.command(log, module, *args)


# ---- data -------------------------------------------------------------------------------------------------


def make_data(s: Setup, data: Path) -> dict:
    """The task's records through its public export: questions, captions (caption_share=1), held-out of each.
    Three draws with different seeds (so different images), joined under one image root."""
    from bonsai_mlx.core import synthetic
    from bonsai_mlx.core.io import atomic_write_text
    from bonsai_mlx.core.synthetic import DEFAULT_DATA

    size = DEFAULT_DATA["image_size"]
    synthetic.export(data / "q", s.n_questions, s.n_eval, seed=s.seed, size=size)
    synthetic.export(data / "c", s.n_captions, 0, seed=s.seed + 1, size=size, caption_share=1.0)
    synthetic.export(data / "ch", s.n_eval_captions, 0, seed=s.seed + 2, size=size, caption_share=1.0)

    def rows(sub: str, name: str) -> list[dict]:
        return [{**r, "image": f"{sub}/images/{r['image']}"} for r in json.loads((data / sub / name).read_text())]

    questions, captions = rows("q", "train.json"), rows("c", "train.json")
    held_q, held_c = rows("q", "eval.json"), rows("ch", "train.json")
    for name, recs in (
        ("questions.json", questions),
        ("captions.json", captions),
        ("all.json", captions + questions),
        ("eval.json", held_q + held_c),
    ):
        atomic_write_text(data / name, json.dumps(recs, indent=1))
    types: dict[str, int] = {}
    for r in held_q + held_c:
        types[r["type"]] = types.get(r["type"], 0) + 1
    return {"image_size": size, "eval_types": types, "questions": len(questions), "captions": len(captions)}


def grounded_records(n: int, seed: int) -> list[dict]:
    """Text-only reading practice: a scene's caption where the image will be, then one of the task's questions
    (or "Describe the image.") about it, as chat records. The stand-in for what a real LM brings from pretraining:
    answering from what the context says. A frozen LM that never saw a fact stated before the question cannot
    read one from the projected image tokens either (measured: with the plain QA text, alignment left the
    caption loss at the LM's text-only prior). Scenes are drawn as the task draws them (1-3 shapes of distinct
    kinds and colours in distinct cells), through its public vocabulary and its `caption` and `question`."""
    from bonsai_mlx.core import synthetic

    rng = random.Random(f"grounded-{seed}")
    out = []
    for i in range(n):
        k = rng.randint(1, 3)
        items = [
            synthetic.Item(kind, colour, cell)
            for kind, colour, cell in zip(
                rng.sample(synthetic.SHAPES, k),
                rng.sample(list(synthetic.COLOURS), k),
                rng.sample(list(synthetic.CELLS), k),
                strict=True,
            )
        ]
        qtype = rng.choice([*synthetic.QTYPES, CAPTION])
        if qtype == CAPTION:
            q, a = "Describe the image.", synthetic.caption(items)
        else:
            q, a = synthetic.question(items, qtype, rng)
        turns = [{"from": "human", "value": f"{synthetic.caption(items)}\n{q}"}, {"from": "gpt", "value": a}]
        out.append({"id": f"grounded-{i}", "type": qtype, "conversations": turns})
    return out


def _texts(records: list[dict], tok) -> list[str]:
    """Each record as the chat text a Pico sees, without the image: the LM's pretraining text."""
    from bonsai_mlx.core.records import messages_of

    out = []
    for r in records:
        msgs = [{**m, "content": m["content"].replace(IMAGE, "").strip()} for m in messages_of(r)]
        out.append(tok.apply_chat_template(msgs, tokenize=False))
    return out


# ---- (a) the language model -------------------------------------------------------------------------------


def pretrain_lm(s: Setup, run: Path, out: Path, log: Path) -> dict:
    """A Qwen2ForCausalLM of the scratch Pico's text shapes, trained on every token of the task's chat text."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from bonsai_mlx.core.config import PicoConfig

    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    tok = AutoTokenizer.from_pretrained(str(run / "scratch"))
    t = PicoConfig.load(run / "scratch").text
    cfg = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        max_position_embeddings=t.max_position_embeddings,
        rms_norm_eps=t.rms_norm_eps,
        tie_word_embeddings=t.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta},
        initializer_range=s.init_std,
        bos_token_id=None,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = Qwen2ForCausalLM(cfg)
    data = run / "data"
    records = _read(data / "all.json") + grounded_records(s.lm_grounded, s.seed)
    train = [tok(x, add_special_tokens=False)["input_ids"] for x in _texts(records, tok)]
    held = [tok(x, add_special_tokens=False)["input_ids"] for x in _texts(_read(data / "eval.json"), tok)]
    pad = tok.pad_token_id

    def batch(seqs: list[list[int]]):
        n = max(len(x) for x in seqs)
        ids = torch.tensor([x + [pad] * (n - len(x)) for x in seqs])
        mask = torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in seqs])
        return ids, mask, ids.masked_fill(mask == 0, -100)

    def held_ppl() -> float:
        model.eval()
        tot, cnt = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(held), 64):
                ids, mask, labels = batch(held[i : i + 64])
                n = int((labels[:, 1:] != -100).sum())
                tot += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * n
                cnt += n
        model.train()
        return math.exp(tot / max(cnt, 1))

    before = held_ppl()
    rng = random.Random(s.seed)

    def lm_loss(step: int):
        ids, mask, labels = batch(rng.sample(train, min(s.lm_batch, len(train))))
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    fit(model, lm_loss, s.lm_steps, s.lm_lr, betas=(0.9, 0.95), log=lambda m: _log(m, log), name="lm step")
    after = held_ppl()
    _log(f"lm held-out text perplexity {before:.2f} -> {after:.2f}", log)
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.parameters())
    return {"params": n, "heldout_text_ppl_before": before, "heldout_text_ppl": after}


# ---- (b) the vision tower ---------------------------------------------------------------------------------


def _pixels(proc, paths: list[Path]):
    import numpy as np
    import torch
    from PIL import Image

    chunks = []
    for i in range(0, len(paths), 256):
        ims = [Image.open(p).convert("RGB") for p in paths[i : i + 256]]
        chunks.append(np.asarray(proc(images=ims, return_tensors="np")["pixel_values"]))
    return torch.from_numpy(np.concatenate(chunks)).float()


def pretrain_siglip(s: Setup, run: Path, out: Path, log: Path) -> dict:
    """A SiglipModel (vision tower of the scratch Pico's shapes + a small text tower) trained with SigLIP's
    sigmoid loss on the caption images and their captions; saved with its image processor and tokenizer."""
    import torch
    from transformers import AutoTokenizer, SiglipConfig, SiglipModel, SiglipTextConfig, SiglipVisionConfig

    try:  # transformers 5.x: the PIL backend by name (the default one wants torchvision)
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    from bonsai_mlx.core.config import PicoConfig

    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    scratch = run / "scratch"
    tok = AutoTokenizer.from_pretrained(str(scratch))
    v = PicoConfig.load(scratch).vision
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(scratch / "preprocessor_config.json", out / "preprocessor_config.json")  # the Pico's
    proc = SiglipImageProcessor.from_pretrained(str(out))
    data = run / "data"
    train, held = _read(data / "captions.json"), [r for r in _read(data / "eval.json") if r["type"] == CAPTION]

    def caps(recs: list[dict]) -> list[str]:
        return [r["conversations"][1]["value"] for r in recs]

    length = max(len(tok(c)["input_ids"]) for c in caps(train) + caps(held)) + 1
    ids_of = lambda recs: torch.tensor(  # noqa: E731
        tok(caps(recs), padding="max_length", max_length=length, truncation=True)["input_ids"]
    )
    tr_ids, tr_px = ids_of(train), _pixels(proc, [data / r["image"] for r in train])
    he_ids, he_px = ids_of(held), _pixels(proc, [data / r["image"] for r in held])
    cfg = SiglipConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=v.num_hidden_layers,
            num_attention_heads=v.num_attention_heads,
            image_size=v.image_size,
            patch_size=v.patch_size,
            layer_norm_eps=v.layer_norm_eps,
            hidden_act=v.hidden_act,
            vision_use_head=True,  # the pooled image embedding the loss needs; `convert init` drops it
        ),
        text_config=SiglipTextConfig(
            vocab_size=len(tok),
            hidden_size=v.hidden_size,
            intermediate_size=v.intermediate_size,
            num_hidden_layers=s.siglip_text_layers,
            num_attention_heads=v.num_attention_heads,
            max_position_embeddings=length,
            projection_size=v.hidden_size,
            pad_token_id=tok.pad_token_id,
            bos_token_id=None,
            eos_token_id=tok.eos_token_id,
        ),
        initializer_factor=1.0,
    )
    model = SiglipModel(cfg)
    with torch.no_grad():  # SigLIP's init of the learned temperature and bias (t' = log 10, b = -10)
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    held_caps = caps(held)

    def retrieval() -> float:
        """Held-out image -> caption top-1 among all held-out captions (an equal caption counts as right)."""
        model.eval()
        with torch.no_grad():
            best = model(input_ids=he_ids, pixel_values=he_px).logits_per_image.argmax(-1).tolist()
        model.train()
        return sum(held_caps[j] == held_caps[i] for i, j in enumerate(best)) / max(len(best), 1)

    before = retrieval()
    g = torch.Generator().manual_seed(s.seed)

    def siglip_loss(step: int):
        idx = torch.randperm(len(train), generator=g)[: s.siglip_batch]
        return model(input_ids=tr_ids[idx], pixel_values=tr_px[idx], return_loss=True).loss

    lg = lambda m: _log(m, log)  # noqa: E731
    fit(model, siglip_loss, s.siglip_steps, s.siglip_lr, weight_decay=1e-4, log=lg, name="siglip sigmoid-loss step")
    after = retrieval()
    _log(f"siglip held-out image->caption top-1 {before:.1%} -> {after:.1%} (of {len(held)})", log)
    model.eval().save_pretrained(str(out))
    tok.save_pretrained(str(out))
    n = sum(p.numel() for p in model.vision_model.parameters())
    return {"vision_params": n, "retrieval_top1_before": before, "retrieval_top1": after, "text_length": length}


# ---- the MLX stages, as commands --------------------------------------------------------------------------


def _read(p: Path) -> list[dict]:
    return json.loads(p.read_text())


def _train_config(run_dir: Path, **opts) -> Path:
    """The options of one `bonsai_mlx.train` run, as the --config file it reads (kept beside the run)."""
    import yaml

    from bonsai_mlx.core.io import atomic_write_text

    run_dir.mkdir(parents=True, exist_ok=True)
    p = run_dir / "train.yaml"
    atomic_write_text(p, yaml.safe_dump(opts, sort_keys=False))
    return p


COMMON = dict(group_by_length=False, save_every=0, eval_every=0, log_every=20, lora_dropout=0.0, max_length=128)


@dataclass(frozen=True)
class Arm:
    """One stage-(e) variant, trained from the aligned model with (e)'s steps and batch. Rates are multiples of
    --instruct-lr: the adapters' `lr`, the projector's `projector` (None: TrainConfig's LLaVA ratio, 0: frozen).
    `adapters=False` trains the projector alone (`--stage align`, no LoRA)."""

    label: str
    trains: str
    data: str = "questions.json"  # under data/; all.json is captions + questions (a third captions)
    captions: float = 0.0  # > 0: the questions and this share of caption records instead (mix_data)
    lr: float = 1.0
    projector: float | None = None
    adapters: bool = True


ARMS: dict[str, Arm] = {
    "instruct": Arm("(e)+(f) after QLoRA instruct, fused (float)", "projector + LoRA on the 4-bit LM"),
    # LLaVA-1.5's stage 2 (LLaVA-665k) keeps descriptions among its instructions
    "mix": Arm("(e') QLoRA instruct on questions + the captions of (d)", "projector + LoRA", data="all.json"),
    "mix-projector-1x": Arm(
        "(e') as mix, the projector at the adapters' rate", "projector + LoRA", data="all.json", projector=1.0
    ),
    "mix-10": Arm("(e') QLoRA instruct, 10% of its records captions", "projector + LoRA", captions=0.1),
    "mix-20": Arm("(e') QLoRA instruct, 20% of its records captions", "projector + LoRA", captions=0.2),
    # LLaVA-1.5's LoRA rate, 2e-4 with the default --instruct-lr
    "low-lr": Arm("(e') QLoRA instruct at 0.4x the rate", "projector + LoRA", lr=0.4),
    # where the alignment goes: freeze each component in turn
    "lora-only": Arm("(e') QLoRA instruct, projector frozen", "LoRA", projector=0.0),
    "projector-only": Arm("(e') projector only on questions, at (e)'s projector rate", "projector", adapters=False),
}


def mix_data(data: Path, share: float) -> Path:
    """All the questions and the first captions of (d)'s data, so that captions are `share` of the records
    (LLaVA-665k keeps a small share of descriptions among its instructions): data/mix-<percent>.json."""
    from bonsai_mlx.core.io import atomic_write_text

    path = data / f"mix-{round(share * 100)}.json"
    if not path.is_file():
        questions, captions = _read(data / "questions.json"), _read(data / "captions.json")
        k = round(len(questions) * share / (1 - share))
        if k > len(captions):
            raise UserError(f"{share:.0%} captions needs {k} caption records; (d) has {len(captions)}")
        atomic_write_text(path, json.dumps(questions + captions[:k], indent=1))
    return path


def arm_names(s: Setup) -> list[str]:
    names = [a.strip() for a in s.arms.split(",") if a.strip()]
    bad = [a for a in names if a not in ARMS]
    if bad or not names:
        raise UserError(
            f"--arms: unknown arm {bad[0] if bad else s.arms!r}; expected a comma list of {', '.join(ARMS)}"
        )
    return names


def arm_stage(arm: str) -> str:
    """The arm's name in stages, folders and evals: the recipe's own (e) keeps the plain names."""
    return "instruct" if arm == "instruct" else f"instruct-{arm}"


def _evaluate(r: Recipe, model: str, name: str, log: Path) -> dict:
    d = r.out / "eval" / name
    d.mkdir(parents=True, exist_ok=True)
    args = ["--model", str(r.out / model), "--data", str(r.out / "data" / "eval.json")]
    args += ["--image-root", str(r.out / "data"), "--out", str(d / "preds.jsonl"), "--metrics", "vqa"]
    args += ["--perplexity", "--max-tokens", str(r.s.eval_max_tokens), "--batch-size", str(r.s.eval_batch)]
    r.cli(log, "bonsai_mlx.evaluate", *args)
    return json.loads((d / "preds.summary.json").read_text())


def check_setup(path: Path, s: Setup) -> None:
    """Finished stages are reused only with the settings that made them: another setting needs another --out."""
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    for k, v in asdict(s).items():
        if k in ("out", "arms", "seeds"):  # where it lives, and stages added beside the finished ones
            continue
        if k in old and old[k] != v:
            raise UserError(
                f"{path.parent}: made with --{k.replace('_', '-')} {old[k]}, not {v}; "
                "use a new --out (or delete the directory) to run with other settings"
            )


def run(s: Setup) -> dict:
    arm_names(s)  # bad --arms / --seeds stop here, before any stage runs
    if s.seeds:
        return run_seeds(s)
    with Steps(s.out, "recipe", state="stages.json", noun="stage", worker=True) as steps:
        return _run(Recipe(s, steps))


def seed_list(s: Setup) -> list[int]:
    try:
        seeds = [int(x) for x in (s.seeds or "").split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--seeds: expected a comma list of integers, got {s.seeds!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds: expected distinct integers, got {s.seeds!r}")
    return seeds


def run_seeds(s: Setup) -> dict:
    """Each seed's recipe under --out/seed-N (finished stages skipped, so seeds run apart can be joined here),
    then every row's mean and spread: results.md / results.json under --out."""
    from bonsai_mlx.core.io import atomic_write_text

    per = [run(replace(s, seed=k, seeds=None, out=str(Path(s.out) / f"seed-{k}"))) for k in seed_list(s)]
    agg = across_seeds(per)
    atomic_write_text(Path(s.out) / "results.json", json.dumps(agg, indent=2))
    atomic_write_text(Path(s.out) / "results.md", seeds_report(agg))
    return agg


def _run(r: Recipe) -> dict:
    s = r.s
    out, data = r.out, r.out / "data"
    from bonsai_mlx.core.io import atomic_write_text

    check_setup(out / "setup.json", s)
    atomic_write_text(out / "setup.json", json.dumps(asdict(s), indent=2))
    r.stage("data", ["data"], lambda log: make_data(s, data))

    def scratch(log: Path) -> dict:
        args = ["init", "--tiny", "--data", str(data / "all.json"), "--image-root", str(data)]
        args += ["--image-size", str(r.state["data"]["image_size"]), "--seed", str(s.seed)]
        for k in ("width", "layers", "vision_layers", "patch_size"):
            if getattr(s, k) is not None:
                args += [f"--{k.replace('_', '-')}", str(getattr(s, k))]
        r.cli(log, CONVERT, *args, str(out / "scratch"))
        return {}

    r.stage("scratch", ["scratch"], scratch)
    r.stage("lm", ["lm"], lambda log: pretrain_lm(s, out, out / "lm", log))
    r.stage("siglip", ["siglip"], lambda log: pretrain_siglip(s, out, out / "siglip", log))
    parts = ["init", "--vision", str(out / "siglip"), "--text", str(out / "lm"), str(out / "pico-assembled")]
    r.stage("assemble", ["pico-assembled"], lambda log: r.cli(log, CONVERT, *parts))
    r.stage("eval-assembled", ["eval/assembled"], lambda log: _evaluate(r, "pico-assembled", "assembled", log))

    b = s.batch_size
    img = str(data)

    def align(log: Path) -> dict:
        cfg = _train_config(
            out / "align",
            **COMMON,
            model=str(out / "pico-assembled"),
            data=str(data / "captions.json"),
            image_root=img,
            stage="align",
            max_steps=s.align_steps,
            batch_size=b,
            lr=s.align_lr,
            warmup=max(1, s.align_steps // 20),
            out=str(out / "align"),
            seed=s.seed,
        )
        r.cli(log, "bonsai_mlx.train", "--config", str(cfg))
        final = str(out / "align" / "checkpoints" / "final")
        r.cli(log, CONVERT, "fuse", str(out / "pico-assembled"), final, str(out / "pico-aligned"))
        return {}

    r.stage("align", ["align", "pico-aligned"], align)
    r.stage("eval-aligned", ["eval/aligned"], lambda log: _evaluate(r, "pico-aligned", "aligned", log))

    def instruct(arm: str, log: Path) -> dict:
        a, name = ARMS[arm], arm_stage(arm)
        lr = s.instruct_lr * a.lr
        proj = None if a.projector is None else s.instruct_lr * a.projector
        if not a.adapters:  # the projector alone, at the rate it has in (e)
            opts: dict = {"stage": "align", "lr": TrainConfig(stage="instruct", lr=lr).component_lrs()["projector"]}
        else:
            opts = {"stage": "instruct", "quantize_base": 4, "lora_rank": s.lora_rank, "lora_alpha": 2.0 * s.lora_rank}
            opts.update(lr=lr, **({} if proj is None else {"projector_lr": proj}))
        cfg = _train_config(
            out / name,
            **COMMON,
            model=str(out / "pico-aligned"),
            data=str(mix_data(data, a.captions) if a.captions else data / a.data),
            image_root=img,
            **opts,
            max_steps=s.instruct_steps,
            batch_size=b,
            warmup=max(1, s.instruct_steps // 20),
            out=str(out / name),
            seed=s.seed,
        )
        r.cli(log, "bonsai_mlx.train", "--config", str(cfg))
        return {}

    def fuse(arm: str, log: Path) -> dict:
        name = arm_stage(arm)
        final = str(out / name / "checkpoints" / "final")
        r.cli(log, CONVERT, "fuse", str(out / "pico-aligned"), final, str(out / f"pico-{name}"))
        if arm == "instruct":
            r.cli(log, CONVERT, "to-mlx", str(out / "pico-instruct"), str(out / "pico-4bit"), "--quantize", "4")
        return {}

    for arm in arm_names(s):
        name = arm_stage(arm)
        fused = f"pico-{name}"
        r.stage(name, [name], lambda log, arm=arm: instruct(arm, log))
        fuse_name = "fuse" if arm == "instruct" else f"fuse-{arm}"
        r.stage(fuse_name, [fused, *(["pico-4bit"] if arm == "instruct" else [])], lambda log, arm=arm: fuse(arm, log))
        r.stage(f"eval-{name}", [f"eval/{name}"], lambda log, f=fused, n=name: _evaluate(r, f, n, log))
        if arm == "instruct":
            r.stage("eval-4bit", ["eval/4bit"], lambda log: _evaluate(r, "pico-4bit", "4bit", log))

    def scratch_full(log: Path) -> dict:
        import yaml

        preset = yaml.safe_load((out / "scratch" / "train.yaml").read_text()) or {}
        steps = s.align_steps + s.instruct_steps  # equal optimizer steps x batch to (d) + (e)
        opts = {**preset, **COMMON, "stage": "full", "max_steps": steps, "batch_size": b}
        opts.update(model=str(out / "scratch"), data=str(data / "all.json"), image_root=img)
        opts.update(out=str(out / "scratch-full"), seed=s.seed, warmup=min(int(preset.get("warmup", 100)), steps // 10))
        r.cli(log, "bonsai_mlx.train", "--config", str(_train_config(out / "scratch-full", **opts)))
        return {"lr": opts.get("lr"), "steps": steps}

    name = "scratch-full"
    r.stage(name, [name], scratch_full)
    r.stage("eval-scratch-full", ["eval/scratch-full"], lambda log: _evaluate(r, "scratch-full/model", name, log))
    summary = summarize(r)
    atomic_write_text(out / "results.json", json.dumps(summary, indent=2))
    atomic_write_text(out / "results.md", report(summary))
    return summary


# ---- the report -------------------------------------------------------------------------------------------


def rows_of(s: Setup) -> list[tuple[str, str, str, tuple[str, ...]]]:
    """(eval name, stage label, what trained, which stages' wall time), in table order."""
    rows = [
        ("assembled", "(c) assembled: pretrained SigLIP + pretrained LM, random projector", "-", ("assemble",)),
        ("aligned", "(d) after align (projector only, captions)", "projector", ("align",)),
    ]
    for arm in arm_names(s):
        name = arm_stage(arm)
        rows.append((name, ARMS[arm].label, ARMS[arm].trains, (name,)))
        if arm == "instruct":
            rows.append(("4bit", "(f) fused, `to-mlx --quantize 4`", "-", ("fuse",)))
    rows.append(("scratch-full", "baseline: `--stage full` from scratch", "everything", ("scratch-full",)))
    return rows


def summarize(r: Recipe) -> dict:
    s, st = r.s, r.state
    types = st["data"]["eval_types"]
    qtypes = sorted(t for t in types if t != CAPTION)
    rows = []
    steps = {"aligned": s.align_steps, "scratch-full": s.align_steps + s.instruct_steps}
    steps.update({arm_stage(a): s.instruct_steps for a in arm_names(s)})
    for name, label, trains, walls in rows_of(s):
        ev = json.loads((r.out / "eval" / name / "preds.summary.json").read_text())
        by = ev.get("vqa_by_type", {})
        n_q = sum(types[t] for t in qtypes)
        rows.append(
            {
                "eval": name,
                "stage": label,
                "trains": trains,
                "steps": steps.get(name, 0),
                "batch": s.batch_size,
                "seconds": sum(st[w]["seconds"] for w in walls),
                "cpu_seconds": sum(st[w].get("cpu_seconds", math.nan) for w in walls),
                "questions": sum(by.get(t, 0.0) * types[t] for t in qtypes) / max(n_q, 1),
                "by_type": {t: by.get(t, 0.0) for t in qtypes},
                "caption_exact": by.get(CAPTION),
                "caption_ppl": ev.get("ppl_by_type", {}).get(CAPTION),
            }
        )
    return {
        "setup": asdict(s),
        "eval_types": types,
        "lm": {k: v for k, v in st["lm"].items()},
        "siglip": {k: v for k, v in st["siglip"].items()},
        "rows": rows,
        "stage_seconds": {k: v["seconds"] for k, v in st.items()},
        "stage_cpu_seconds": {k: v.get("cpu_seconds") for k, v in st.items()},
        "total_seconds": round(sum(v["seconds"] for v in st.values()), 1),
    }


def report(summary: dict) -> str:
    s, rows, types = summary["setup"], summary["rows"], summary["eval_types"]
    qtypes = sorted(rows[0]["by_type"])
    lm, sg = summary["lm"], summary["siglip"]
    n_q = sum(types[t] for t in qtypes)
    lines = [
        "# The two-stage recipe in miniature (experiments.recipe)",
        "",
        f"Held-out: {n_q} questions (one per unseen image) and {types.get(CAPTION, 0)} reference captions. "
        "Accuracy is greedy exact match; caption perplexity is per token over the reference captions given the "
        "image (`evaluate --perplexity`).",
        "",
        f"| stage | trains | steps x batch | wall s (CPU s) | questions | {' | '.join(qtypes)} | caption exact "
        "| caption ppl |",
        "|---|---|---|---|---|" + "---|" * len(qtypes) + "---|---|",
    ]
    for row in rows:
        cap = row["caption_exact"]
        ppl = row["caption_ppl"]
        cells = [
            row["stage"],
            row["trains"],
            f"{row['steps']} x {row['batch']}" if row["steps"] else "-",
            f"{row['seconds']:.0f} ({row['cpu_seconds']:.0f})",
            f"**{row['questions']:.1%}**",
            *(f"{row['by_type'][t]:.1%}" for t in qtypes),
            "-" if cap is None else f"{cap:.1%}",
            "-" if ppl is None else f"{ppl:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    st = summary["stage_seconds"]
    lines += [
        "",
        "Pretrained parts (PyTorch, transformers):",
        "",
        f"- (a) LM: Qwen2ForCausalLM, {lm['params'] / 1e6:.2f}M parameters, {s['lm_steps']} steps x "
        f"{s['lm_batch']} sequences of the task's chat text (its captions and QA without the image, and "
        f"{s['lm_grounded']} caption-then-question records), {st['lm']:.0f} s; "
        f"held-out text perplexity {lm['heldout_text_ppl_before']:.1f} -> {lm['heldout_text_ppl']:.2f}.",
        f"- (b) SigLIP: SiglipModel, vision tower {sg['vision_params'] / 1e6:.2f}M parameters, sigmoid loss, "
        f"{s['siglip_steps']} steps x {s['siglip_batch']} image-caption pairs, {st['siglip']:.0f} s; held-out "
        f"image -> caption top-1 among {types.get(CAPTION, 0)}: {sg['retrieval_top1_before']:.0%} -> "
        f"{sg['retrieval_top1']:.0%}.",
        "",
        f"Compute: the baseline gets the optimizer steps x batch of (d) + (e) together "
        f"({s['align_steps'] + s['instruct_steps']} x {s['batch_size']}) on the same captions + questions; "
        f"pretraining (a) + (b) ({st['lm'] + st['siglip']:.0f} s) is on top of that for the recipe. "
        f"All stages: {summary['total_seconds']:.0f} s wall.",
    ]
    return "\n".join(lines) + "\n"


def _mean_sd(xs: list[float]) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5 if len(xs) > 1 else 0.0


def across_seeds(per: list[dict]) -> dict:
    """The rows of several seeds' summaries: each number's per-seed values, mean and sample sd. A row's caption
    perplexity is also given relative to (d)'s of the same seed (the issue's "after (e) <= 1.2 x after (d)")."""
    rows = []
    for i, row in enumerate(per[0]["rows"]):
        same = [p["rows"][i] for p in per]
        aligned = [next(r for r in p["rows"] if r["eval"] == "aligned") for p in per]

        def stat(xs: list[float]) -> dict:
            m, sd = _mean_sd(xs)
            return {"values": xs, "mean": m, "sd": sd}

        ppl = [r["caption_ppl"] for r in same]
        rows.append(
            {
                **{k: row[k] for k in ("eval", "stage", "trains", "steps", "batch")},
                "seconds": stat([r["seconds"] for r in same]),
                "questions": stat([r["questions"] for r in same]),
                "by_type": {t: stat([r["by_type"][t] for r in same]) for t in row["by_type"]},
                "caption_ppl": None if None in ppl else stat(ppl),
                "ppl_vs_aligned": None
                if None in ppl
                else stat([x / a["caption_ppl"] for x, a in zip(ppl, aligned, strict=True)]),
            }
        )
    return {"seeds": [p["setup"]["seed"] for p in per], "setup": per[0]["setup"], "rows": rows}


def seeds_report(agg: dict) -> str:
    rows, seeds = agg["rows"], agg["seeds"]
    qtypes = sorted(rows[0]["by_type"])
    lines = [
        f"# The two-stage recipe in miniature, {len(seeds)} seeds ({', '.join(map(str, seeds))})",
        "",
        "Mean over seeds (± sample sd); each seed draws its own data, pretrains its own parts and trains its own "
        'runs. Caption perplexity: per token of the held-out reference captions; "vs (d)" divides each seed\'s by '
        "its aligned model's.",
        "",
        f"| stage | trains | questions | per seed | {' | '.join(qtypes)} | caption ppl | vs (d) |",
        "|---|---|---|---|" + "---|" * len(qtypes) + "---|---|",
    ]
    for row in rows:
        q, ppl, rel = row["questions"], row["caption_ppl"], row["ppl_vs_aligned"]
        cells = [
            row["stage"],
            row["trains"],
            f"**{q['mean']:.1%}** ± {q['sd']:.1%}",
            " / ".join(f"{v:.1%}" for v in q["values"]),
            *(f"{row['by_type'][t]['mean']:.1%}" for t in qtypes),
            "-" if ppl is None else f"{ppl['mean']:.2f}",
            "-" if rel is None else f"{rel['mean']:.2f}x",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m experiments.recipe",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_options(ap, Setup)
    ap.add_argument("--quick", action="store_true", help="a smoke run in tens of seconds (numbers mean nothing)")
    from bonsai_mlx.core.errors import friendly

    a = ap.parse_args(sys.argv[1:] if argv is None else argv)
    s = from_args(Setup, a)
    if a.quick:  # the smoke sizes, where no flag says otherwise
        for k, v in QUICK.items():
            if getattr(s, k) == getattr(Setup, k):
                setattr(s, k, v)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with friendly("recipe"):
        t = time.perf_counter()
        summary = run(s)
    print(seeds_report(summary) if s.seeds else report(summary))
    print(f"results: {Path(s.out) / 'results.md'}, {Path(s.out) / 'results.json'} ({time.perf_counter() - t:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
