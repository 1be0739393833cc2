"""LLaVA conversation records -> token ids with assistant-only labels (both trainers build on this).

Records: {"id", "image" (optional), "conversations": [{"from": "human"|"gpt"|"system", "value"}]},
from a JSON list, JSONL, or a `datasets` directory / hub id with the same columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from bonsai_mlx.core.errors import InputNotFound, UserError

IGNORE = -100
IMAGE_TAG = "<image>"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class BadSample(UserError):
    """A record that cannot be used (missing image, malformed turns...)."""


def read_records(source: str | Path) -> list[dict]:
    p = Path(source)
    if p.is_file():
        text = p.read_text()
        try:
            if p.suffix == ".jsonl":
                return [_json_line(p, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if not isinstance(data, list):
            raise UserError(f"{p}: expected a JSON list of LLaVA records")
        return data
    looks_local = p.suffix in (".json", ".jsonl") or p.is_absolute() or str(source).startswith(".")
    if p.is_dir() or ("/" in str(source) and not looks_local):
        import datasets

        if p.is_dir():
            return [dict(r) for r in datasets.load_from_disk(str(p))]
        try:
            ds = datasets.load_dataset(str(source), split="train")
        except FileNotFoundError as e:  # (datasets' DatasetNotFoundError is one too)
            raise InputNotFound(f"{source}: no such data file, datasets directory or hub dataset ({e})") from None
        return [dict(r) for r in ds]
    raise InputNotFound(f"{source}: no such data file")


def _json_line(p: Path, n: int, line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: line {n} is not valid JSON ({e.msg} at column {e.colno})") from None


def messages_of(rec: dict) -> list[dict]:
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise BadSample("no 'conversations' list")
    msgs = []
    for turn in conv:
        role = ROLES.get(turn.get("from", turn.get("role")) if isinstance(turn, dict) else None)
        value = turn.get("value", turn.get("content")) if isinstance(turn, dict) else None
        if role is None or not isinstance(value, str):
            raise BadSample(f"malformed turn {turn!r:.60}")
        msgs.append({"role": role, "content": value})
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadSample("no assistant (gpt) turn to learn from")
    return msgs


def record_ids(records: list, source: str = "data") -> list[str]:
    """One id per record, the same for every reader (trainers, extract, evaluate): the record's own "id",
    or "#<position>" when it has none. Ids key caches, predictions and skip reports, so a repeat is refused."""
    ids: list[str] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records):
        rid = rec.get("id") if isinstance(rec, dict) else None
        rid = f"#{i}" if rid is None else str(rid)
        if rid in seen:
            raise UserError(
                f"{source}: records {seen[rid]} and {i} share the id {rid!r}; ids must be unique "
                "(drop the 'id' fields to key records by position)"
            )
        seen[rid] = i
        ids.append(rid)
    return ids


def place_image(msgs: list[dict], has_image: bool) -> tuple[list[dict], int]:
    """Where a record's image goes: its own <image> tags, else one at the start of the first user turn.

    Returns (messages, number of image tags). The one rule for every reader of records."""
    n = sum(m["content"].count(IMAGE_TAG) for m in msgs)
    if has_image and n == 0:
        k = next((k for k, m in enumerate(msgs) if m["role"] == "user"), None)
        if k is None:
            raise BadSample("an image but no user turn to put it in")
        msgs = [*msgs[:k], {**msgs[k], "content": f"{IMAGE_TAG}\n{msgs[k]['content']}"}, *msgs[k + 1 :]]
        n = 1
    return msgs, n


def _encode(processor, text: str, base: int, offsets: list | None) -> list[int]:
    if offsets is None:
        return processor.encode_text(text)
    enc = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets += [(base + a, base + b) for a, b in enc["offset_mapping"]]
    return enc["input_ids"]


def tokenize(
    processor, msgs: list[dict], max_length: int | None = None, offsets: list | None = None
) -> tuple[list[int], list[int], bool]:
    """ids, labels (IGNORE outside assistant answers and their end token), truncated?

    Pass a list as `offsets` to also get each token's character span in the rendered conversation
    (`processor.render(msgs, add_generation_prompt=False)`), which distillation aligns on.
    """
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    stop = processor.stop_ids
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = processor.render(msgs[:k], add_generation_prompt=True)
        full = processor.render(msgs[: k + 1], add_generation_prompt=False)
        if not prefix.startswith(done) or not full.startswith(prefix):
            raise UserError("the chat template does not render conversations prefix-stably; cannot mask labels")
        ctx = _encode(processor, prefix[len(done) :], len(done), offsets)
        ans = _encode(processor, full[len(prefix) :], len(prefix), offsets)
        last = max((i for i, t in enumerate(ans) if t in stop), default=len(ans) - 1)
        ids += ctx + ans
        labels += [IGNORE] * len(ctx) + ans[: last + 1] + [IGNORE] * (len(ans) - last - 1)
        done = full
    truncated = max_length is not None and len(ids) > max_length
    if truncated:
        ids, labels = ids[:max_length], labels[:max_length]
        run = len(ids) - next((i + 1 for i in range(len(ids) - 1, -1, -1) if ids[i] != processor.image_token_id), 0)
        if run % processor.config.num_image_tokens:
            raise BadSample(f"max_length {max_length} cuts through the image tokens")
    return ids, labels, truncated


def answer_spans(render, msgs: list[dict]) -> list[tuple[int, int, int]]:
    """(start, end, lead) of each assistant answer in `render(msgs, False)`, found after the generation prompt of
    its own turn (as `tokenize` splits it), never earlier: "A" or "yes" also occur in prompts ("ASSISTANT",
    Qwen's "Alibaba", a multiple-choice question). `lead` = whitespace the template puts between its generation
    prompt and the answer (Llava-1.5's "ASSISTANT:" + " A"): a token may start there and still end in the answer.

    `render(messages, add_generation_prompt)` is a processor's or the teacher's own rendering."""
    full = render(msgs, False)
    spans = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        prefix = render(msgs[:k], True)
        turn = render(msgs[: k + 1], False)
        if not turn.startswith(prefix) or not full.startswith(turn):
            raise UserError("the chat template does not render conversations prefix-stably; cannot place answers")
        at = turn.find(m["content"], len(prefix))
        if at < 0:
            raise BadSample(f"answer {m['content'][:40]!r} not found after its turn's generation prompt")
        gap = turn[len(prefix) : at]
        spans.append((at, at + len(m["content"]), len(gap) - len(gap.rstrip())))
    return spans


def check_image_tokens(processor, ids: list[int], n_images: int, truncated: bool = False) -> None:
    """Every built example must hold exactly n_images blocks of image tokens, or the model cannot place the
    image features: a mismatch is a BadSample here instead of a crash mid-run."""
    per = processor.config.num_image_tokens
    have = ids.count(processor.image_token_id)
    if have != n_images * per:
        why = " (max_length cut before the image)" if truncated and have < n_images * per else ""
        raise BadSample(f"{have} image tokens for {n_images} image(s) of {per} tokens{why}")


@dataclass
class Example:
    id: str
    ids: list[int]
    labels: list[int]
    image: str | None
    n_images: int


@dataclass
class Dataset:
    """Tokenized records, bad ones skipped and counted (or raised with on_bad='error')."""

    examples: list[Example]
    bad: dict[str, str] = field(default_factory=dict)
    truncated: int = 0

    @classmethod
    def build(
        cls,
        records: list[dict],
        processor,
        image_root: str | Path | None = None,
        max_length: int | None = None,
        on_bad: str = "skip",
    ) -> Dataset:
        out, bad, trunc = [], {}, 0
        root = Path(image_root) if image_root else None
        for rec, rid in zip(records, record_ids(records), strict=True):
            try:
                if not isinstance(rec, dict):
                    raise BadSample("record is not an object")
                img = rec.get("image")
                msgs, n_img = place_image(messages_of(rec), bool(img))
                if n_img > 1:
                    raise BadSample(f"{n_img} <image> tags; one image per record is supported")
                if n_img and not img:
                    raise BadSample("<image> in the text but no 'image' field")
                path = None
                if img:
                    path = str(root / img) if root else str(img)
                    if not Path(path).is_file():
                        raise BadSample(f"image file {path} not found")
                ids, labels, t = tokenize(processor, msgs, max_length)
                check_image_tokens(processor, ids, n_img, t)
                if all(label == IGNORE for label in labels):
                    raise BadSample("no assistant token left after truncation")
                trunc += t
                out.append(Example(rid, ids, labels, path, n_img))
            except BadSample as e:
                if on_bad == "error":
                    raise UserError(f"record {rid}: {e}") from None
                bad[rid] = str(e)
        return cls(out, bad, trunc)

    def summary(self) -> str:
        s = f"{len(self.examples)} samples, {len(self.bad)} skipped, {self.truncated} truncated"
        if self.bad:
            first = list(self.bad.items())[:5]
            s += "; skipped: " + "; ".join(f"{k} ({v})" for k, v in first) + (" ..." if len(self.bad) > 5 else "")
        return s
