"""python -m bonsai_mlx.evaluate: greedy answers over an eval set, metrics overall and per question type.

Predictions are appended to a JSONL file as they are produced, so an interrupted run resumes where it
stopped; the file's first line names the model, the data and the settings (`bonsai_mlx.predictions`), and a file
another run wrote is refused, never reused. A record whose image is missing or unreadable becomes a counted
error row (left out of the scores, retried by the next run), not an abort.

Metrics: VQA-normalised accuracy (vqa), POPE-style yes/no (yesno), ROUGE-L (rouge), BLEU-4
(bleu), CIDEr-D (cider; checked against pycocoevalcap's scorer), METEOR (meteor; pycocoevalcap's reference
Java jar, so it needs `java`), and per-token perplexity of the reference answers (ppl, or --perplexity:
exp of the mean cross-entropy over the assistant tokens that training supervises, no generation needed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.records import record_ids
from bonsai_mlx.metrics import bleu4, cider_d, meteor, meteor_jar, pope, rouge_l, vqa_accuracy, yes_no

METRICS = ("vqa", "yesno", "rouge", "bleu", "cider", "meteor", "ppl")
DEFAULT_METRICS = ("vqa", "yesno", "rouge", "bleu", "cider")  # meteor starts a JVM; ppl is a second pass
GENERATED = ("vqa", "yesno", "rouge", "bleu", "cider", "meteor")  # the metrics that score generated answers


def qa_of(rec: dict, rid: str | None = None) -> dict:
    """{id, question, answers, image, type} from a LLaVA conversation or a question/answer record.

    `rid` is the record's id from `record_ids` (its own id, else its position): never the question text, which
    POPE/VQA-style sets repeat across images."""
    try:
        if "conversations" in rec:
            conv = rec["conversations"]
            q = next(t["value"] for t in conv if t.get("from") in ("human", "user"))
            a = next(t["value"] for t in conv if t.get("from") in ("gpt", "assistant"))
            answers = [a]
        else:
            q, a = rec["question"], rec["answer"] if "answer" in rec else rec["answers"]
            answers = a if isinstance(a, list) else [a]
        if not isinstance(q, str):
            raise TypeError
    except (KeyError, StopIteration, TypeError, AttributeError):
        raise UserError(
            f"record {rid}: expected 'conversations' with a human and a gpt turn, or 'question' and 'answer(s)'"
        ) from None
    return {
        "id": rid if rid is not None else str(rec["id"]),
        "question": q.replace("<image>", "").strip(),
        "answers": answers,
        "image": rec.get("image"),
        "type": rec.get("type", rec.get("question_type")),
    }


def predict(
    model, proc, qas: list[dict], image_root: str | None, max_tokens: int, errors: dict[str, str] | None = None
) -> list[str | None]:
    """Greedy answers for a batch of question records (see `qa_of`). Each image is read once, here; with
    `errors`, a record whose image cannot be read gets None and its message in `errors` (else ImageError)."""
    from bonsai_mlx.core.images import ImageError, load_image
    from bonsai_mlx.generate import generate_batch

    images: list = []
    for qa in qas:
        img = qa["image"]
        path = str(Path(image_root) / img) if img and image_root else img
        try:
            images.append(load_image(path) if path else None)
        except ImageError as e:
            if errors is None:
                raise
            errors[qa["id"]] = str(e)
            images.append(e)
    ok = [i for i, im in enumerate(images) if not isinstance(im, ImageError)]
    answers = generate_batch(model, proc, [(qas[i]["question"], images[i]) for i in ok], max_tokens) if ok else []
    out: list[str | None] = [None] * len(qas)
    for i, a in zip(ok, answers, strict=True):
        out[i] = a.strip()
    return out


def predict_records(
    model, proc, records: list[dict], image_root: str | None, max_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    qas = [qa_of(r, rid) for r, rid in zip(records, record_ids(records), strict=True)]
    out: list[str] = []
    for i in range(0, len(qas), batch_size):
        out += predict(model, proc, qas[i : i + batch_size], image_root, max_tokens)
    return out


def score(rows: list[dict], metrics=DEFAULT_METRICS) -> dict:
    """Metrics over the answered rows; error rows (no prediction: a bad image) are counted, not scored."""
    failed = [r for r in rows if r.get("error") is not None]
    rows = [r for r in rows if r.get("error") is None]
    out: dict = {"n": len(rows)}
    if failed:
        out["errors"] = len(failed)
        out["error_ids"] = [r["id"] for r in failed[:20]]
    if not rows:
        return out
    if "vqa" in metrics:
        out["vqa"] = sum(vqa_accuracy(r["prediction"], r["answers"]) for r in rows) / len(rows)
        types = sorted({r["type"] for r in rows if r.get("type")})
        if types:
            by = {t: [r for r in rows if r.get("type") == t] for t in types}
            out["vqa_by_type"] = {
                t: sum(vqa_accuracy(r["prediction"], r["answers"]) for r in rs) / len(rs) for t, rs in by.items()
            }
    if "yesno" in metrics:
        yn = [r for r in rows if yes_no(r["answers"][0]) is not None]
        if yn:
            out["yesno"] = pope([r["prediction"] for r in yn], [r["answers"][0] for r in yn]) | {"n": len(yn)}
    if "rouge" in metrics:
        out["rouge_l"] = sum(max(rouge_l(r["prediction"], a) for a in r["answers"]) for r in rows) / len(rows)
    if "bleu" in metrics:
        out["bleu4"] = bleu4([r["prediction"] for r in rows], [r["answers"] for r in rows])
    if "cider" in metrics:
        out["cider"] = cider_d([r["prediction"] for r in rows], [r["answers"] for r in rows])
    if "meteor" in metrics:
        out["meteor"] = meteor([r["prediction"] for r in rows], [r["answers"] for r in rows])
    return out


def _ppl_records(records: list[dict], source: str) -> tuple[list[dict], list[tuple[str, str | None]]]:
    """Conversation records to score, id-less (keyed by position), and each one's (record id, question type).

    A LLaVA record is scored as training sees it (every assistant turn); a question/answer(s) record becomes one
    conversation per reference answer, the question as the user turn."""
    convs, owners = [], []
    for rec, rid in zip(records, record_ids(records, source), strict=True):
        qtype = rec.get("type", rec.get("question_type")) if isinstance(rec, dict) else None
        if isinstance(rec, dict) and "conversations" in rec:
            convs.append({k: v for k, v in rec.items() if k != "id"})
            owners.append((rid, qtype))
            continue
        qa = qa_of(rec, rid)
        for a in qa["answers"]:
            if not isinstance(a, str):
                raise UserError(f"record {rid}: answers must be strings, got {a!r:.40}")
            turns = [{"from": "human", "value": rec["question"]}, {"from": "gpt", "value": a}]
            convs.append({"image": rec.get("image"), "conversations": turns})
            owners.append((rid, qtype))
    return convs, owners


def perplexity(
    model, proc, records: list[dict], image_root: str | None = None, batch_size: int = 16, source: str = "data"
) -> dict:
    """Per-token perplexity of the reference answers given image + prompt: exp(summed cross-entropy / number of
    supervised tokens), with the labels training builds (core.records: the assistant turns and their end token;
    never the prompt or image tokens) and training's loss (loss.ce_at). Overall and per question type.

    Returns {"ppl", "ppl_tokens", "ppl_samples", "ppl_by_type" (when records have types), "ppl_skipped"}."""
    import math

    from bonsai_mlx.core.batching import collate
    from bonsai_mlx.core.records import Dataset
    from bonsai_mlx.loss import ce_at, forward_states, to_mx

    convs, owners = _ppl_records(records, source)
    ds = Dataset.build(convs, proc, image_root)
    pad = proc.pad_id
    groups: dict[str | None, list] = {}
    for e in ds.examples:  # one type per batch, so each type's sums come straight from ce_at
        groups.setdefault(owners[int(e.id[1:])][1], []).append(e)
    skipped = len(ds.bad)
    sums: dict[str | None, tuple[float, int, int]] = {}
    model.eval()
    for t, exs in groups.items():
        ce, n, k = 0.0, 0, 0
        for i in range(0, len(exs), batch_size):
            b = collate(exs[i : i + batch_size], proc, pad)
            skipped += len(b.skipped)
            if not b.ids:
                continue
            bm = to_mx(b)
            h, _ = forward_states(model, bm, False, False)
            ce += ce_at(model, h, bm["positions"], bm["targets"]).item()
            n, k = n + len(b.targets), k + len(b.ids)
        sums[t] = (ce, n, k)
    total_n = sum(n for _, n, _ in sums.values())
    if total_n == 0:
        raise UserError(f"{source}: no record with an answer to score for perplexity ({ds.summary()})")
    out: dict = {
        "ppl": math.exp(sum(c for c, _, _ in sums.values()) / total_n),
        "ppl_tokens": total_n,
        "ppl_samples": sum(k for _, _, k in sums.values()),
        "ppl_skipped": skipped,
    }
    typed = sorted(t for t, (_, n, _) in sums.items() if t and n)
    if typed:
        out["ppl_by_type"] = {t: math.exp(sums[t][0] / sums[t][1]) for t in typed}
    return out


def table(s: dict) -> str:
    lines = ["| metric | value |", "|---|---|", f"| samples | {s['n']} |"]
    if s.get("errors"):
        lines.append(f"| errors (bad image, not scored) | {s['errors']} |")
    for k in ("vqa", "rouge_l", "bleu4", "cider", "meteor", "ppl"):
        if k in s:
            lines.append(f"| {k} | {s[k]:.4f} |")
    for t, v in s.get("vqa_by_type", {}).items():
        lines.append(f"| vqa / {t} | {v:.4f} |")
    for t, v in s.get("ppl_by_type", {}).items():
        lines.append(f"| ppl / {t} | {v:.4f} |")
    if "ppl" in s:
        lines.append(f"| ppl tokens (samples, skipped) | {s['ppl_tokens']} ({s['ppl_samples']}, {s['ppl_skipped']}) |")
    for k, v in s.get("yesno", {}).items():
        lines.append(f"| yes/no {k} | {v:.4f} |" if isinstance(v, float) else f"| yes/no {k} | {v} |")
    return "\n".join(lines)


def evaluate(
    model,
    proc,
    records: list[dict],
    out: Path,
    image_root: str | None = None,
    max_tokens: int = 32,
    metrics=DEFAULT_METRICS,
    progress: bool = True,
    batch_size: int = 16,
    source: str = "data",
    head: dict | None = None,
) -> dict:
    """Answer every record (appending to `out`, resuming from it) and score; `ppl` alone generates nothing.

    `head`: the predictions file's header (`predictions.header`); by default it names `proc.dir`'s weights,
    the records and `max_tokens`. A file with another header is refused (UserError), never reused."""
    from tqdm import tqdm

    from bonsai_mlx import predictions

    ppl = perplexity(model, proc, records, image_root, batch_size, source) if "ppl" in metrics else {}
    if not any(m in GENERATED for m in metrics):
        return {"n": len(records), **ppl}
    qas = [qa_of(r, rid) for r, rid in zip(records, record_ids(records, source), strict=True)]
    if head is None:
        head = predictions.header(proc.dir, source, predictions.data_sha256(None, records), image_root, max_tokens)
    done = predictions.read(out, head)
    todo = [q for q in qas if q["id"] not in done or done[q["id"]].get("error") is not None]  # errors: retried
    predictions.start(out, head)
    bar = tqdm(desc="evaluate", disable=not progress, initial=len(qas) - len(todo), total=len(qas), unit="sample")
    with open(out, "a+b") as f, bar:
        f.seek(0, 2)
        if f.tell() and (f.seek(-1, 2), f.read(1))[1] != b"\n":
            f.write(b"\n")  # a row cut short by a crash stays on its own line
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            errors: dict[str, str] = {}
            for qa, pred in zip(chunk, predict(model, proc, chunk, image_root, max_tokens, errors), strict=True):
                row = {**qa, "prediction": pred}
                if qa["id"] in errors:
                    row["error"] = errors[qa["id"]]
                f.write((json.dumps(row) + "\n").encode())
                done[qa["id"]] = row
            f.flush()
            bar.update(len(chunk))
    return score([done[q["id"]] for q in qas], metrics) | ppl


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bonsai_mlx.evaluate", description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="LLaVA conversation JSON/JSONL or question/answer records")
    ap.add_argument("--image-root")
    ap.add_argument(
        "--out",
        default="preds.jsonl",
        help="predictions, appended as produced; resumes only a file this model, data and settings wrote",
    )
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16, help="questions answered together (same answers)")
    ap.add_argument(
        "--metrics",
        default=",".join(DEFAULT_METRICS),
        help=f"comma list of {', '.join(METRICS)} (meteor needs java; ppl: see --perplexity)",
    )
    ap.add_argument(
        "--perplexity",
        action="store_true",
        help="also report per-token perplexity of the reference answers (assistant tokens only), overall and per "
        "type; with --metrics ppl only perplexity is computed (no generation)",
    )
    ap.add_argument("--limit", type=int, help="only the first N records")
    a = ap.parse_args(argv)
    from bonsai_mlx import predictions
    from bonsai_mlx.core.errors import friendly
    from bonsai_mlx.core.io import atomic_write_text
    from bonsai_mlx.core.records import read_records
    from bonsai_mlx.generate import load

    with friendly("evaluate"):
        metrics = tuple(m for m in a.metrics.split(",") if m) + (("ppl",) if a.perplexity else ())
        unknown = [m for m in metrics if m not in METRICS]
        if unknown:
            raise UserError(f"--metrics: unknown {unknown[0]!r} (choose from {', '.join(METRICS)})")
        if "meteor" in metrics:
            meteor_jar()  # before loading the model: no java -> say how to install it
        all_recs = read_records(a.data)
        recs = all_recs[: a.limit]
        model, proc = load(a.model)
        head = None
        if any(m in GENERATED for m in metrics):  # the whole data set's hash: --limit N resumes into the full run
            data_hash = predictions.data_sha256(a.data, all_recs)
            head = predictions.header(proc.dir, a.data, data_hash, a.image_root, a.max_tokens)
            predictions.read(Path(a.out), head)  # another run's file: refused before any work
        s = evaluate(
            model,
            proc,
            recs,
            Path(a.out),
            a.image_root,
            a.max_tokens,
            metrics,
            batch_size=a.batch_size,
            source=a.data,
            head=head,
        )
        summary = Path(a.out).with_suffix(".summary.json")
        atomic_write_text(summary, json.dumps({**s, "run": head} if head else s, indent=2))
        print(table(s))
        if s.get("errors"):
            ids = ", ".join(s["error_ids"]) + (", ..." if s["errors"] > len(s["error_ids"]) else "")
            print(f"{s['errors']} records had an unreadable image and were not scored: {ids} (see {a.out})")
        print(f"predictions: {a.out}; summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
