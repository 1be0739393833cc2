"""python -m train_cuda.extract: run the teacher once and cache its hidden states at aligned units.

Resumable (finished shards are skipped), prints the projected disk size first, and writes a cache
that `train_cuda.distill` and `bonsai_mlx.train --stage distill` both read.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonsai_mlx.core.align import grid_weights, text_units
from bonsai_mlx.core.config import PicoConfig
from bonsai_mlx.core.errors import UserError
from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import BadSample, messages_of, place_image, read_records, record_ids, tokenize
from bonsai_mlx.core.teacher_cache import (
    TOKENS_FILE,
    CacheWriter,
    Entry,
    file_fingerprint,
    tokenizer_fingerprint,
    vocab_fingerprint,
)
from bonsai_mlx.core.vocab_map import encode_tokens, fallback_ids, shared_vocab_of, token_bytes
from train_cuda.teacher import Teacher, answer_spans


@dataclass
class Plan:
    sid: str
    t_ids: list[int]
    pairs: list[tuple[int, int]]
    image: str | None
    same_next: list[int]  # units whose next token is the same in both tokenizations (where logits compare)
    # logit units beyond `pairs`: the last prompt token before each answer, (teacher pos, student pos, strip): both
    # models predict the answer's first token there; strip: the teacher's token carries the space before it
    # (Llama's "▁red" after "ASSISTANT:") where the student's does not (Qwen's "red" after "assistant\n")
    starts: list[tuple[int, int, bool]] = field(default_factory=list)
    ends: list[tuple[int, int]] = field(default_factory=list)  # (teacher id, student id) of the token after answers


def plan_sample(
    rec: dict, teacher: Teacher, student: Processor, image_root: str | None, sid: str | None = None
) -> Plan:
    msgs, _ = place_image(messages_of(rec), bool(rec.get("image")))
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    s_off: list = []
    s_ids = tokenize(student, msgs, offsets=s_off)[0]
    s_text = student.render(msgs, add_generation_prompt=False)
    t_text = teacher.render(msgs)
    t_ids, t_off = teacher.encode(t_text)
    pairs, starts, ends = [], [], []
    for ts, ss, ans in zip(answer_spans(t_text, answers), answer_spans(s_text, answers), answers, strict=True):
        units = text_units(t_off, ts, s_off, ss)
        pairs += units
        start = answer_start(teacher.tokenizer, t_ids, t_off, ts, student.tokenizer, s_ids, s_off, ss, ans)
        if start is not None:
            starts.append(start)
        if units:  # the answer's last unit ends it: what follows is each template's end of turn
            t, s = units[-1]
            if t_off[t][1] == ts[1] and s_off[s][1] == ss[1] and t + 1 < len(t_ids) and s + 1 < len(s_ids):
                ends.append((t_ids[t + 1], s_ids[s + 1]))
    img = rec.get("image")
    path = str(Path(image_root) / img) if img and image_root else img
    # logit units: the aligned units, then the answer starts; same_next indexes that list
    same = [
        k
        for k, (t, s) in enumerate(pairs + [(t, s) for t, s, _ in starts])
        if t + 1 < len(t_ids) and s + 1 < len(s_ids) and t_ids[t + 1] == s_ids[s + 1]
    ]
    return Plan(record_ids([rec])[0] if sid is None else sid, t_ids, pairs, path, same, starts, ends)


def answer_start(t_tok, t_ids, t_off, t_span, s_tok, s_ids, s_off, s_span, answer: str):
    """(teacher pos, student pos, strip) of the last prompt token before an answer in each tokenization, when
    the token after it begins the answer in both (the teacher's possibly with the one space its template puts
    before the answer: strip); None when a token straddles the prompt and the answer in another way."""
    from bonsai_mlx.core.vocab_map import piece_bytes, scheme_of

    def before(ids, off, span, tok):
        last = [i for i, (a, b) in enumerate(off) if b > a and b <= span[0] and i + 1 < len(ids)]
        if not last:
            return None
        i = last[-1]
        return i, piece_bytes(tok.convert_ids_to_tokens(ids[i + 1]), scheme_of(tok))

    t, s = before(t_ids, t_off, t_span, t_tok), before(s_ids, s_off, s_span, s_tok)
    if t is None or s is None or t[1] is None or s[1] is None:
        return None
    text = answer.encode("utf-8")
    strip = t[1].startswith(b" ") and not s[1].startswith(b" ") and not text.startswith(b" ")
    t_next = t[1][1:] if strip else t[1]
    if not (t_next and s[1] and text.startswith(t_next[: len(text)]) and text.startswith(s[1][: len(text)])):
        return None
    return t[0], s[0], strip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train_cuda.extract", description=__doc__)
    ap.add_argument("--teacher", required=True, help="teacher Llava directory or hub id (llava-hf/llava-1.5-7b-hf)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--image-root")
    ap.add_argument("--student-tokenizer", required=True, help="the student Pico directory (tokenizer, template, grid)")
    ap.add_argument("--layers", default="-1", help="teacher hidden_states indices, e.g. -1,16")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default=None, help="teacher compute dtype on GPU (default bfloat16)")
    ap.add_argument("--load-4bit", action="store_true", help="teacher in bitsandbytes NF4 (GPU only)")
    ap.add_argument("--max-samples", type=int)
    ap.add_argument("--per-shard", type=int, default=256)
    ap.add_argument("--pca", type=int, metavar="K", help="store K PCA coordinates per state instead of all of them")
    ap.add_argument("--pca-samples", type=int, default=256, help="samples the PCA basis is fitted on")
    ap.add_argument(
        "--logits-topk",
        "--kl-topk",
        dest="logits_topk",
        type=int,
        default=0,
        metavar="K",
        help="also store the teacher's top-K next-token logits at every aligned text unit and answer start, and "
        "its token strings (for distill --kl in any --kl-mode: same vocabulary or not)",
    )
    from bonsai_mlx.core.errors import glue_negative_lists

    a = ap.parse_args(glue_negative_lists(sys.argv[1:] if argv is None else argv, ("--layers",)))
    from bonsai_mlx.core.errors import friendly

    with friendly("extract"):
        return run(a)


def run(a) -> int:
    from tqdm import tqdm

    layers = [int(x) for x in a.layers.split(",")]
    sdir = Path(a.student_tokenizer)
    scfg = PicoConfig.load(sdir)
    student = Processor(sdir, scfg)
    teacher = Teacher.load(a.teacher, a.dtype, a.load_4bit)
    if a.logits_topk < 0:
        raise UserError(f"--logits-topk must be a positive number of logits per unit, got {a.logits_topk}")
    if teacher.device == "cpu":
        print("extract: no CUDA device: running the teacher in float32 on the CPU (no 4-bit, no FlashAttention-2)")
    records = read_records(a.data)
    ids = record_ids(records, a.data)  # over the whole file: the trainers key the same records the same way
    plans, bad = [], {}
    planned = ids[: a.max_samples]
    for rec, sid in list(zip(records, ids, strict=True))[: a.max_samples]:
        try:
            plans.append(plan_sample(rec, teacher, student, a.image_root, sid))
        except (BadSample, ValueError) as e:
            bad[sid] = str(e)
    if vocab_fingerprint(teacher.tokenizer) != vocab_fingerprint(student.tokenizer):
        for p in plans:
            p.same_next = []  # ids of two vocabularies never compare, even where the numbers happen to be equal
    hidden = teacher.model.config.text_config.hidden_size
    s_grid = scfg.vision.grid
    units = sum(len(p.pairs) + (s_grid * s_grid if p.image else 0) for p in plans)
    width = min(a.pca, hidden) if a.pca else hidden
    print(
        f"{len(plans)} samples ({len(bad)} skipped), {units:,} aligned units x {len(layers)} layers x {width} "
        f"-> about {units * len(layers) * width * 2 / 1e9:.2f} GB on disk (fp16{', PCA' if a.pca else ''})"
    )
    manifest = {
        "teacher": str(a.teacher),
        "teacher_layers": teacher.model.config.text_config.num_hidden_layers,  # for the relative-depth layer map
        "layers": layers,
        "normalisation": "layernorm",
        "hidden_size": hidden,
        "student_tokenizer": tokenizer_fingerprint(student.tokenizer, student.chat_template),
        "teacher_grid": teacher.grid,
        "student_grid": s_grid,
        "student_strategy": scfg.vision_feature_select_strategy,
        "geometry": "teacher padded to square, student stretched",
        "dtype": "float16",
        "teacher_vocab": vocab_fingerprint(teacher.tokenizer),
        # what the cache was made from: a resume with other inputs is refused (or, --max-samples, redone)
        "data": file_fingerprint(a.data),
        "image_root": str(Path(a.image_root).resolve()) if a.image_root else None,
        "teacher_dtype": str(teacher.model.dtype).removeprefix("torch."),
        "load_4bit": bool(a.load_4bit),
        "max_samples": a.max_samples,
    }
    vocab_size = teacher.model.config.text_config.vocab_size  # the LM head's width (may exceed the tokenizer)
    if a.logits_topk:
        ends = Counter(e for p in plans for e in p.ends)
        manifest["logits"] = {
            "topk": min(a.logits_topk, vocab_size),
            "units": "every aligned text unit, then the last prompt token before each answer (same_next: units "
            "whose next token is the same in both; strip_space: the teacher's next token carries a leading space)",
            "tokens": TOKENS_FILE,
            "vocab_size": vocab_size,
            # the tokens that follow an answer in each template (e.g. </s> and <|im_end|>): the same event
            "end_of_turn": list(ends.most_common(1)[0][0]) if ends else None,
        }
    if a.pca:
        manifest["pca"] = width
    writer = CacheWriter(a.out, manifest, a.per_shard)
    if a.logits_topk:
        writer.write_tokens(encode_tokens(token_bytes(teacher.tokenizer, vocab_size)), fallback_ids(teacher.tokenizer))
        shared = shared_vocab_of(teacher.tokenizer, student.tokenizer)
        print(
            f"teacher logits: top-{manifest['logits']['topk']} per aligned unit; {len(shared):,} of the teacher's "
            f"{shared.n_teacher:,} text tokens ({shared.coverage:.1%}) have an equal-string student token"
        )
    if a.pca and not writer.has_basis():
        writer.set_basis(fit_basis(teacher, plans[: a.pca_samples], layers, s_grid, width, a.batch_size))
    # shards are cut from the planned ids (skipped ones included), so a resume over other inputs redoes them
    shard_ids = [planned[i : i + a.per_shard] for i in range(0, len(planned), a.per_shard)]
    writer.keep_shards(len(shard_ids))
    by_id = {p.sid: p for p in plans}
    bar = tqdm(total=len(plans), desc="extract", unit="sample")
    for k, sids in enumerate(shard_ids):
        shard = [by_id[sid] for sid in sids if sid in by_id]
        if writer.shard_done(k, sids):
            bar.update(len(shard))
            continue
        entries = {}
        for batch, pixels in prefetched(teacher, shard, a.batch_size, bad):
            entries.update(extract_batch(teacher, batch, layers, s_grid, bad, a.logits_topk, pixels))
            bar.update(len(batch))
        writer.write_shard(k, entries, sids)
    bar.close()
    if bad:
        print(f"skipped {len(bad)}: " + "; ".join(f"{k} ({v})" for k, v in list(bad.items())[:5]))
    print(f"cache: {a.out}")
    return 0


def fit_basis(teacher: Teacher, plans: list[Plan], layers: list[int], s_grid: int, k: int, batch_size: int):
    """PCA of each layer's states over the aligned units of the first samples (an extra teacher pass)."""
    from tqdm import tqdm

    from bonsai_mlx.core.teacher_cache import PcaFit

    fits = {L: PcaFit(teacher.model.config.text_config.hidden_size) for L in layers}
    for i in tqdm(range(0, len(plans), batch_size), desc="fitting PCA", unit="batch"):
        for e in extract_batch(teacher, plans[i : i + batch_size], layers, s_grid, {}).values():
            for L in layers:
                fits[L].add(e.text[L])
                if L in e.image:
                    fits[L].add(e.image[L])
    basis = {}
    for L in layers:
        mean, comps, kept = fits[L].finish(k)
        basis[L] = (mean, comps)
        print(f"PCA layer {L}: {k} components keep {kept:.1%} of the variance")
    return basis


def load_pixels(teacher: Teacher, batch: list[Plan], bad: dict) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """{sid: (teacher pixel values, original (width, height))} for the batch's images; failures go to `bad`."""
    out = {}
    for p in batch:
        if p.image:
            try:
                im = load_image(p.image)
                out[p.sid] = (teacher.pixel_values(im)[0], im.size)
            except ImageError as e:
                bad[p.sid] = str(e)
    return out


def prefetched(teacher: Teacher, plans: list[Plan], batch_size: int, bad: dict):
    """(batch, its decoded images), decoding the next batch's images in a thread while this one runs."""
    from concurrent.futures import ThreadPoolExecutor

    batches = [plans[i : i + batch_size] for i in range(0, len(plans), batch_size)]
    if not batches:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(load_pixels, teacher, batches[0], bad)
        for i, batch in enumerate(batches):
            pixels = nxt.result()
            if i + 1 < len(batches):
                nxt = pool.submit(load_pixels, teacher, batches[i + 1], bad)
            yield batch, pixels


def pool_images(teacher: Teacher, states, rows: list[int], positions: list[list[int]], sizes, s_grid: int):
    """Teacher image states of batch rows `rows` -> (N, s_grid^2, D) at the student's patches, on the
    teacher's device in one batched pair of matmuls (per-image weights: each image has its own shape)."""
    import torch

    dev = states.device
    g = teacher.grid
    img = torch.stack([states[b, pos] for b, pos in zip(rows, positions, strict=True)])  # (N, tokens, D)
    grid = teacher.patch_states(img).reshape(len(rows), g, g, -1)
    w = [grid_weights(g, s_grid, size) for size in sizes]
    r = torch.tensor(np.stack([x for x, _ in w]), dtype=torch.float32, device=dev)  # (N, s, g)
    c = torch.tensor(np.stack([y for _, y in w]), dtype=torch.float32, device=dev)
    t = torch.einsum("nia,nabd->nibd", r, grid)
    return torch.einsum("njb,nibd->nijd", c, t).reshape(len(rows), s_grid * s_grid, -1)


def extract_batch(
    teacher: Teacher,
    batch: list[Plan],
    layers: list[int],
    s_grid: int,
    bad: dict,
    topk: int = 0,
    pixels: dict | None = None,
) -> dict[str, Entry]:
    if pixels is None:
        pixels = load_pixels(teacher, batch, bad)
    ok = [p for p in batch if not p.image or p.sid in pixels]
    if not ok:
        return {}
    # text-only and image samples go in separate forwards (the teacher takes one pixel tensor per call)
    out = {}
    for group in ([p for p in ok if p.image], [p for p in ok if not p.image]):
        if not group:
            continue
        px = np.stack([pixels[p.sid][0] for p in group]) if group[0].image else None
        states, top = teacher.forward([p.t_ids for p in group], px, layers, topk)
        pooled = {}
        if px is not None:
            pos = [[i for i, t in enumerate(p.t_ids) if t == teacher.image_token_id] for p in group]
            sizes = [pixels[p.sid][1] for p in group]
            for L, st in zip(layers, states, strict=True):
                pooled[L] = pool_images(teacher, st, list(range(len(group))), pos, sizes, s_grid).cpu().numpy()
        for b, p in enumerate(group):
            at = [t for t, _ in p.pairs]
            text = {L: st[b, at].cpu().numpy() for L, st in zip(layers, states, strict=True)}
            image = {L: pooled[L][b] for L in pooled}
            e = out[p.sid] = Entry([s for _, s in p.pairs], at, text, image)
            if top is not None:  # aligned units and answer starts; same-vocab KL uses those whose next token is shared
                kat = at + [t for t, _, _ in p.starts]
                e.kl_teacher_pos = kat
                e.kl_student_pos = [s for _, s in p.pairs] + [s for _, s, _ in p.starts]
                e.same_next = list(p.same_next)
                e.strip_space = [len(p.pairs) + j for j, (_, _, strip) in enumerate(p.starts) if strip]
                e.topk_logits = top[0][b, kat].cpu().numpy()
                e.topk_ids = top[1][b, kat].cpu().numpy().astype(np.int32)
                e.topk_lse = top[2][b, kat].cpu().numpy().astype(np.float32)
    return out


if __name__ == "__main__":
    sys.exit(main())
