"""Why does alignment not teach the recipe's frozen tiny LM to read the image? Cheap measurements on a recipe run.

    python -m experiments.recipe_diagnose RUN_DIR [--n 300] [--probe 3000] [--threads 1]

RUN_DIR is a `python -m experiments.recipe --out RUN_DIR` directory with at least its `lm` and `siglip`
stages done. Prints one JSON object:

- `lm`: the pretrained LM (a) on held-out "caption, then question" text (`grounded_records` with an unseen seed):
  greedy exact match per question type with the caption in the context and without it (its text prior), and the
  per-token loss of held-out captions (the align stage's target: assistant tokens and the end token) given
  "Describe the image." alone (the text prior, where alignment starts) and after the caption as text (what a
  perfectly read image could at best give a reader of text). If the LM does not answer from the caption text, a
  projector cannot teach it to answer from image tokens.
- `caption_entropy`: the entropy of a caption under the task's scene distribution, per caption token: the loss of
  the best image-blind model, to judge "the caption loss sits at 0.34" against.
- `probe`: linear probes (multinomial logistic regression on the frozen SigLIP tower's last hidden states, the
  features the projector sees) of each cell's colour and shape ("nothing" included), trained on fresh images and
  scored on others: what the vision side offers the projector at all.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path


def caption_entropy(tok) -> dict:
    """Entropy (nats) of the task's caption: 1-3 shapes (uniform), distinct cells, kinds and colours."""
    from bonsai_mlx.core import synthetic

    h = math.log(3)
    for k in (1, 2, 3):
        n = math.comb(4, k) * math.perm(len(synthetic.SHAPES), k) * math.perm(len(synthetic.COLOURS), k)
        h += math.log(n) / 3
    return {"nats": h}


def lm_reading(run: Path, n: int) -> dict:
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from experiments.recipe import CAPTION, grounded_records

    tok = AutoTokenizer.from_pretrained(str(run / "lm"))
    lm = Qwen2ForCausalLM.from_pretrained(str(run / "lm")).eval()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    recs = grounded_records(n, seed=12345)

    def split(human: str) -> tuple[str, str]:
        scene, q = human.split("\n", 1)
        return scene, q

    def answer(human: str) -> str:
        text = tok.apply_chat_template([{"role": "user", "content": human}], add_generation_prompt=True, tokenize=False)
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=end, pad_token_id=end)
        return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()

    def loss(human: str, ans: str) -> tuple[float, int]:
        """Summed CE of the answer's tokens and its end token (the trainer's label mask), and their count."""
        msgs = [{"role": "user", "content": human}]
        ctx = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        full = tok.apply_chat_template([*msgs, {"role": "assistant", "content": ans}], tokenize=False)
        a = tok(ctx, add_special_tokens=False)["input_ids"]
        b = tok(full[len(ctx) :], add_special_tokens=False)["input_ids"]
        b = b[: b.index(end) + 1]
        ids = torch.tensor([a + b])
        labels = torch.tensor([[-100] * len(a) + b])
        with torch.no_grad():
            out = lm(input_ids=ids, labels=labels)
        return out.loss.item() * len(b), len(b)

    acc: dict[str, dict[str, list[bool]]] = {"with_caption": {}, "without": {}}
    cap: dict[str, list[float]] = {"prior": [0.0, 0], "read": [0.0, 0]}
    for r in recs:
        human, gold = r["conversations"][0]["value"], r["conversations"][1]["value"]
        scene, q = split(human)
        if r["type"] == CAPTION:
            for key, h in (("prior", q), ("read", human)):
                s, k = loss(h, gold)
                cap[key][0] += s
                cap[key][1] += k
            continue
        for key, h in (("with_caption", human), ("without", q)):
            acc[key].setdefault(r["type"], []).append(answer(h) == gold)
    per = {k: {t: sum(v) / len(v) for t, v in sorted(d.items())} for k, d in acc.items()}
    return {
        "accuracy": per,
        "caption_loss_per_token": {k: s / max(c, 1) for k, (s, c) in cap.items()},
        "caption_tokens_per_caption": cap["prior"][1] / max(1, sum(r["type"] == CAPTION for r in recs)),
        "n": n,
    }


def _scene(caption: str) -> dict[str, tuple[str, str]]:
    """'top left: red circle; top right: nothing; ...' -> {cell: (colour, kind)} ('nothing' for both if empty)."""
    out = {}
    for part in caption.rstrip(".").split("; "):
        cell, what = part.split(": ")
        out[cell] = ("nothing", "nothing") if what == "nothing" else tuple(what.split(" "))
    return out


def _fit_probe(x, y, cut: int) -> float:
    """L2-regularised multinomial logistic regression on x[:cut], accuracy on x[cut:]."""
    import torch

    w = torch.zeros(x.shape[1], int(y.max()) + 1, requires_grad=True)
    b = torch.zeros(int(y.max()) + 1, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(x[:cut] @ w + b, y[:cut]) + 1e-3 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return ((x[cut:] @ w + b).argmax(-1) == y[cut:]).float().mean().item()


def probe(run: Path, n: int) -> dict:
    """Per-cell colour and shape from the frozen tower's patch features, by a linear classifier per cell."""
    import numpy as np
    import torch
    from transformers import SiglipModel

    from bonsai_mlx.core import synthetic

    try:
        from transformers import SiglipImageProcessorPil as SiglipImageProcessor
    except ImportError:
        from transformers import SiglipImageProcessor

    proc = SiglipImageProcessor.from_pretrained(str(run / "siglip"))
    tower = SiglipModel.from_pretrained(str(run / "siglip")).vision_model.eval()
    size = proc.size["height"]
    samples = [synthetic.sample(i, 4242, size, caption_share=1.0) for i in range(n)]
    with torch.no_grad():
        px = torch.from_numpy(
            np.asarray(proc(images=[s["image"] for s in samples], return_tensors="np")["pixel_values"])
        )
        feats = torch.cat([tower(pixel_values=px[i : i + 256]).last_hidden_state for i in range(0, n, 256)])
    feats = feats.reshape(n, -1).numpy()  # every patch's features, concatenated: the cell's patches are in there
    scenes = [_scene(s["turns"][0][1]) for s in samples]
    cut = n * 2 // 3
    out: dict[str, float] = {}
    x = torch.tensor((feats - feats[:cut].mean(0)) / (feats[:cut].std(0) + 1e-6), dtype=torch.float32)
    for attr, j in (("colour", 0), ("shape", 1)):
        accs, base = [], []
        for cell in synthetic.CELLS:
            names = sorted({sc[cell][j] for sc in scenes})
            y = torch.tensor([names.index(sc[cell][j]) for sc in scenes])
            accs.append(_fit_probe(x, y, cut))
            base.append(max((y[cut:] == c).float().mean().item() for c in range(len(names))))
        out[attr] = float(np.mean(accs))
        out[attr + "_majority"] = float(np.mean(base))
    # 'nothing' (an empty cell) is one of the classes of both: the majority share is the blind baseline
    return {"per_cell_accuracy": out, "train": cut, "test": n - cut, "feature_dim": int(x.shape[1])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--n", type=int, default=300, help="held-out grounded records for the LM's reading test")
    ap.add_argument("--probe", type=int, default=3000, help="fresh images for the linear probes (0: skip)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(str(a.run / "lm"))
    res: dict = {"caption_entropy": caption_entropy(tok), "lm": lm_reading(a.run, a.n)}
    per_tok = res["lm"]["caption_tokens_per_caption"]
    res["caption_entropy"]["per_caption_token"] = res["caption_entropy"]["nats"] / per_tok
    if a.probe:
        res["probe"] = probe(a.run, a.probe)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
