"""Teacher targets for the student loss, one path for both modes: the offline cache (`train_cuda.extract`) and
the online teacher (`train_cuda.online_teacher`, a no-grad forward inside the training step).

    record --plan_sample--> Plan (teacher ids, aligned units, answer starts)
    Plans + images --teacher.forward--> states, top-k --targets_from_forward--> {sample id: Entry}

`Entry` is what `CacheReader.get` returns, so `gather_targets` reads either mode the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonsai_mlx.core.align import grid_weights, text_units
from bonsai_mlx.core.images import ImageError, load_image
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.provenance import ids_check
from bonsai_mlx.core.records import answer_spans, messages_of, place_image, record_ids, tokenize
from bonsai_mlx.core.teacher_cache import Entry
from train_cuda.teacher import Teacher


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
    ids_check: tuple[int, str] | None = None  # (n, digest of the student's first n ids): guards edited records


def plan_sample(
    rec: dict, teacher: Teacher, student: Processor, image_root: str | None, sid: str | None = None
) -> Plan:
    """One record's alignment: the teacher's ids as its own processor makes them (BOS included), and each answer
    located after its own turn's generation prompt in both renderings."""
    msgs, _ = place_image(messages_of(rec), bool(rec.get("image")))
    answers = [m["content"] for m in msgs if m["role"] == "assistant"]
    s_off: list = []
    s_ids = tokenize(student, msgs, offsets=s_off)[0]
    t_ids, t_off = teacher.encode(teacher.render(msgs))
    t_spans, s_spans = answer_spans(teacher.render, msgs), answer_spans(student.render, msgs)
    pairs, starts, ends = [], [], []
    for (t0, t1, t_lead), (s0, s1, s_lead), ans in zip(t_spans, s_spans, answers, strict=True):
        ts, ss = (t0, t1), (s0, s1)
        units = text_units(t_off, ts, s_off, ss, t_lead, s_lead)
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
    logit_units = pairs + [(t, s) for t, s, _ in starts]
    same = [
        k
        for k, (t, s) in enumerate(logit_units)
        if t + 1 < len(t_ids) and s + 1 < len(s_ids) and t_ids[t + 1] == s_ids[s + 1]
    ]
    check = ids_check(s_ids, [s for _, s in logit_units])
    return Plan(record_ids([rec])[0] if sid is None else sid, t_ids, pairs, path, same, starts, ends, check)


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


def logit_positions(p: Plan) -> list[int]:
    """Teacher positions of a plan's logit units: the aligned units, then the answer starts."""
    return [t for t, _ in p.pairs] + [t for t, _, _ in p.starts]


def targets_from_forward(
    teacher: Teacher, group: list[Plan], states, top, sizes, layers: list[int], s_grid: int
) -> dict[str, Entry]:
    """THE function both modes share: one teacher forward's outputs (normalised `states` per layer, (B, L, D)
    tensors; `top` = one (values, ids, lse) per row at `logit_positions`, or None) and the plans of its rows ->
    each sample's targets (float32), as the student loss reads them. `sizes`: the images' (width, height), or
    None for a text-only group."""
    pooled = {}
    if sizes is not None:
        pos = [[i for i, t in enumerate(p.t_ids) if t == teacher.image_token_id] for p in group]
        for L, st in zip(layers, states, strict=True):
            pooled[L] = pool_images(teacher, st, list(range(len(group))), pos, sizes, s_grid).cpu().numpy()
    out = {}
    for b, p in enumerate(group):
        at = [t for t, _ in p.pairs]
        text = {L: st[b, at].cpu().numpy() for L, st in zip(layers, states, strict=True)}
        image = {L: pooled[L][b] for L in pooled}
        e = out[p.sid] = Entry([s for _, s in p.pairs], at, text, image)
        e.ids_check = p.ids_check
        if top is not None:  # aligned units and answer starts; same-vocab KL uses those whose next token is shared
            values, ids, lse = top[b]
            e.kl_teacher_pos = logit_positions(p)
            e.kl_student_pos = [s for _, s in p.pairs] + [s for _, s, _ in p.starts]
            e.same_next = list(p.same_next)
            e.strip_space = [len(p.pairs) + j for j, (_, _, strip) in enumerate(p.starts) if strip]
            e.topk_logits = values.cpu().numpy()
            e.topk_ids = ids.cpu().numpy().astype(np.int32)
            e.topk_lse = lse.cpu().numpy().astype(np.float32)
    return out


def teacher_targets(
    teacher: Teacher,
    batch: list[Plan],
    layers: list[int],
    s_grid: int,
    bad: dict,
    topk: int = 0,
    pixels: dict | None = None,
) -> dict[str, Entry]:
    """Run the teacher on a batch of plans and return their targets (`targets_from_forward`); a sample whose
    image fails goes to `bad`. Text-only and image samples go in separate forwards (one pixel tensor per call)."""
    if pixels is None:
        pixels = load_pixels(teacher, batch, bad)
    ok = [p for p in batch if not p.image or p.sid in pixels]
    out = {}
    for group in ([p for p in ok if p.image], [p for p in ok if not p.image]):
        if not group:
            continue
        px = np.stack([pixels[p.sid][0] for p in group]) if group[0].image else None
        at = [logit_positions(p) for p in group] if topk else None
        states, top = teacher.forward([p.t_ids for p in group], px, layers, topk, at=at)
        sizes = [pixels[p.sid][1] for p in group] if px is not None else None
        out.update(targets_from_forward(teacher, group, states, top, sizes, layers, s_grid))
    return out


PROBE = [  # a conversation whose answers show what each template writes after an answer (its end of turn)
    {"from": "human", "value": "Is it red?"},
    {"from": "gpt", "value": "yes"},
    {"from": "human", "value": "And the other one?"},
    {"from": "gpt", "value": "It is blue."},
]


def end_of_turn(teacher: Teacher, student: Processor) -> list[int] | None:
    """(teacher id, student id) of the tokens that follow an answer in each template (e.g. </s> and <|im_end|>):
    a property of the two templates, found on a probe conversation, so both modes record the same pair."""
    from collections import Counter

    try:
        ends = Counter(plan_sample({"conversations": PROBE}, teacher, student, None, "probe").ends)
    except ValueError:
        return None
    return list(ends.most_common(1)[0][0]) if ends else None


def targets_manifest(teacher: Teacher, student: Processor, layers: list[int], topk: int = 0) -> dict:
    """What the targets are (teacher, layers, widths, grids, student tokenizer, logits): the manifest fields both
    the cache and the online teacher describe themselves with (from the config: no weights needed)."""
    from bonsai_mlx.core.teacher_cache import TOKENS_FILE, tokenizer_fingerprint, vocab_fingerprint

    text = teacher.config.text_config
    m = {
        "teacher": str(teacher.path),
        "teacher_layers": text.num_hidden_layers,  # for the relative-depth layer map
        "layers": list(layers),
        "normalisation": "layernorm",
        "hidden_size": text.hidden_size,
        "student_tokenizer": tokenizer_fingerprint(student.tokenizer, student.chat_template),
        "teacher_grid": teacher.grid,
        "student_grid": student.config.vision.grid,
        "student_strategy": student.config.vision_feature_select_strategy,
        "geometry": "teacher padded to square, student stretched",
        "dtype": "float16",
        "teacher_vocab": vocab_fingerprint(teacher.tokenizer),
    }
    if topk:
        m["logits"] = {
            "topk": min(topk, text.vocab_size),
            "units": "every aligned text unit, then the last prompt token before each answer (same_next: units "
            "whose next token is the same in both; strip_space: the teacher's next token carries a leading space)",
            "tokens": TOKENS_FILE,
            "vocab_size": text.vocab_size,  # the LM head's width (may exceed the tokenizer)
            "end_of_turn": end_of_turn(teacher, student),
        }
    return m
