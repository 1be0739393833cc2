"""Logit distillation across tokenizers: which tokens two vocabularies share, and which loss to use.

Plain Python/NumPy (shared by `train_cuda` and `bonsai_mlx`). A token is compared by the bytes it stands for,
so SentencePiece's "▁the" (Llama, Mistral) and byte-level BPE's "Ġthe" (Qwen, GPT-2) are the same token
" the", and a byte-fallback piece "<0x0A>" is Qwen's "Ċ" (a newline). Special and added control tokens
(<s>, <|im_end|>, <image>) stand for no text and are never shared.

Modes of the logit term (`--kl-mode`):
    same-vocab    KL(teacher top-k || student) over one shared vocabulary (ids compare directly)
    uld           Universal Logit Distillation (Boizard et al. 2024): L1 (= Wasserstein-1) distance between the
                  two next-token distributions each sorted by probability, top-k: needs no shared tokens at all
    shared-vocab  KL over the tokens whose decoded strings are equal, both distributions renormalised over
                  that set; coverage = share of the teacher's probability mass that falls on it
    auto          same-vocab when the vocabularies are one, else shared-vocab when its coverage is at least
                  AUTO_MIN_COVERAGE, else uld
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bonsai_mlx.core.errors import UserError

KL_MODES = ("auto", "same-vocab", "uld", "shared-vocab")
AUTO_MIN_COVERAGE = 0.5  # auto picks shared-vocab only if the shared tokens keep at least this teacher mass
SCHEMES = ("byte-level", "sentencepiece", "plain")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (what byte-level BPE vocabularies are written in), inverted."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def _walk(node) -> list[str]:
    """Every component `type` in a tokenizers JSON subtree (decoders and pre-tokenizers nest in Sequences)."""
    if isinstance(node, dict):
        out = [node["type"]] if isinstance(node.get("type"), str) else []
        if node.get("type") == "Replace" and node.get("pattern", {}).get("String") == "▁":
            out.append("Metaspace")
        for v in node.values():
            out += _walk(v)
        return out
    if isinstance(node, list):
        return [t for v in node for t in _walk(v)]
    return []


def scheme_of(tok) -> str:
    """How a tokenizer writes its tokens: 'byte-level' (GPT-2/Qwen 'Ġ'), 'sentencepiece' ('▁', byte fallback
    '<0xNN>') or 'plain' (the string itself). Read from the fast tokenizer's decoder, else guessed from the vocab."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        parts = [getattr(backend, "decoder", None), getattr(backend, "pre_tokenizer", None)]
        kinds = [k for p in parts if p is not None for k in _walk(json.loads(p.__getstate__()))]
        if "ByteLevel" in kinds:
            return "byte-level"
        if "Metaspace" in kinds:
            return "sentencepiece"
    vocab = tok.get_vocab()
    sp = sum(s.startswith("▁") for s in vocab)
    bl = sum(s.startswith("Ġ") for s in vocab)
    if max(sp, bl) < 0.05 * max(len(vocab), 1):
        return "plain"
    return "sentencepiece" if sp > bl else "byte-level"


def piece_bytes(piece: str, scheme: str) -> bytes | None:
    """The bytes one vocabulary entry stands for (None: not representable, e.g. a stray character)."""
    if scheme == "byte-level":
        table = _byte_decoder()
        try:
            return bytes(table[c] for c in piece)
        except KeyError:
            return None
    if scheme == "sentencepiece":
        m = _BYTE_PIECE.match(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode("utf-8")
    if scheme == "plain":
        return piece.encode("utf-8")
    raise ValueError(f"unknown token scheme {scheme!r} (expected one of {SCHEMES})")


def token_bytes(tok, size: int | None = None) -> list[bytes | None]:
    """Per token id (0 .. size-1; default the tokenizer's length) the bytes it decodes to, None for special and
    added control tokens and for ids the tokenizer does not have (padding rows of an LM head)."""
    scheme = scheme_of(tok)
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1 if size is None else size
    out: list[bytes | None] = [None] * size
    added = getattr(tok, "added_tokens_decoder", {}) or {}
    control = {i for i, t in added.items() if getattr(t, "special", True)}
    control |= set(getattr(tok, "all_special_ids", []) or [])
    for piece, i in vocab.items():
        if i >= size or i in control:
            continue
        if i in added:  # a non-special added token is literal text, not written in the vocabulary's scheme
            out[i] = piece.encode("utf-8")
        else:
            out[i] = piece_bytes(piece, scheme)
    return out


def encode_tokens(tokens: list[bytes | None]) -> list:
    """JSON-able form of `token_bytes`: text when the bytes are UTF-8, else the list of byte values, null for None."""
    out: list = []
    for b in tokens:
        if b is None:
            out.append(None)
            continue
        try:
            out.append(b.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(list(b))
    return out


def decode_tokens(items: list, where: str = "tokens") -> list[bytes | None]:
    """Inverse of `encode_tokens`; anything else is refused naming `where`."""
    out: list[bytes | None] = []
    for k, x in enumerate(items):
        if x is None:
            out.append(None)
        elif isinstance(x, str):
            out.append(x.encode("utf-8"))
        elif isinstance(x, list) and all(isinstance(v, int) and 0 <= v < 256 for v in x):
            out.append(bytes(x))
        else:
            raise UserError(f"{where}: entry {k} is {x!r}; expected a string, a list of byte values, or null")
    return out


@dataclass
class SharedVocab:
    """Teacher and student ids of the tokens both vocabularies have (equal decoded bytes), one-to-one."""

    teacher_ids: np.ndarray  # (S,) int32
    student_ids: np.ndarray  # (S,) int32, student_ids[j] decodes to the same bytes as teacher_ids[j]
    n_teacher: int  # teacher tokens that stand for text
    n_student: int

    def __len__(self) -> int:
        return len(self.teacher_ids)

    @property
    def coverage(self) -> float:
        """Share of the teacher's text tokens that the student also has (by count, not by probability)."""
        return len(self) / max(self.n_teacher, 1)

    def student_of(self, teacher_ids: np.ndarray) -> np.ndarray:
        """Map teacher ids to the shared student ids, -1 where the student has no such token."""
        lut = np.full(max(int(self.teacher_ids.max(initial=-1)) + 1, int(np.max(teacher_ids, initial=-1)) + 1), -1)
        lut[self.teacher_ids] = self.student_ids
        ids = np.asarray(teacher_ids)
        return np.where(ids >= 0, lut[np.clip(ids, 0, None)], -1).astype(np.int32)

    def with_pair(self, teacher_id: int, student_id: int) -> SharedVocab:
        """This map plus one more pair (e.g. the two templates' end-of-turn tokens), unless either id is taken."""
        if teacher_id in self.teacher_ids or student_id in self.student_ids:
            return self
        t = np.append(self.teacher_ids, np.int32(teacher_id)).astype(np.int32)
        s = np.append(self.student_ids, np.int32(student_id)).astype(np.int32)
        return SharedVocab(t, s, self.n_teacher + 1, self.n_student + 1)

    def mass_coverage(self, topk_ids: np.ndarray, topk_logits: np.ndarray, lse: np.ndarray | None = None) -> float:
        """Mean over units of the teacher probability mass that falls on shared tokens: of the top-k mass
        (each row renormalised over its k tokens), or of the whole distribution when its log-normaliser `lse`
        (logsumexp over the full vocabulary) is given."""
        if len(topk_ids) == 0:
            return float("nan")
        x = np.asarray(topk_logits, np.float64)
        norm = np.asarray(lse, np.float64)[:, None] if lse is not None else _lse(x)
        p = np.exp(x - norm)
        return float((p * (self.student_of(topk_ids) >= 0)).sum(-1).mean())


def _lse(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return m + np.log(np.exp(x - m).sum(-1, keepdims=True))


def build_shared_vocab(
    teacher: list[bytes | None],
    student: list[bytes | None],
    teacher_fallback: set[int] | None = None,
    student_fallback: set[int] | None = None,
) -> SharedVocab:
    """Pair tokens that decode to the same bytes. Where one side has several tokens for the same bytes (Llama's
    byte piece <0x20> and '▁' are both b' '), the regular piece wins over a byte-fallback one, then the lowest
    id: each shared string is one teacher id and one student id, so both distributions stay distributions."""

    def first(tokens: list[bytes | None], fallback: set[int]) -> dict[bytes, int]:
        out: dict[bytes, int] = {}
        for rank in (0, 1):  # regular pieces first, then byte-fallback pieces for strings still missing
            for i, b in enumerate(tokens):
                if b is None or b == b"" or (i in fallback) != bool(rank):
                    continue
                out.setdefault(b, i)
        return out

    t = first(teacher, teacher_fallback or set())
    s = first(student, student_fallback or set())
    both = sorted((t[b], s[b]) for b in t.keys() & s.keys())
    ids = np.asarray(both, np.int32).reshape(-1, 2)
    return SharedVocab(ids[:, 0].copy(), ids[:, 1].copy(), len(t), len(s))


def fallback_ids(tok) -> set[int]:
    """Ids of a SentencePiece tokenizer's byte-fallback pieces (<0x00>..<0xFF>); empty for other schemes."""
    if scheme_of(tok) != "sentencepiece":
        return set()
    return {i for p, i in tok.get_vocab().items() if _BYTE_PIECE.match(p)}


def shared_vocab_of(teacher_tok, student_tok) -> SharedVocab:
    """`build_shared_vocab` for two loaded tokenizers."""
    return build_shared_vocab(
        token_bytes(teacher_tok), token_bytes(student_tok), fallback_ids(teacher_tok), fallback_ids(student_tok)
    )


def choose_kl_mode(requested: str, same_vocab: bool, shared_coverage: float | None) -> tuple[str, str]:
    """(mode, why) for `--kl-mode requested`. `shared_coverage`: the teacher mass the shared tokens keep on the
    cache (None when the cache cannot tell: it holds no teacher token strings)."""
    if requested not in KL_MODES:
        raise UserError(f"--kl-mode must be one of {', '.join(KL_MODES)}, got {requested!r}")
    if requested == "same-vocab" and not same_vocab:
        raise UserError(
            "--kl-mode same-vocab: the teacher and the student do not share a vocabulary, so their token ids "
            "cannot be compared; use --kl-mode uld or shared-vocab (or auto)"
        )
    if requested == "shared-vocab" and shared_coverage is None:
        raise UserError(
            "--kl-mode shared-vocab: the cache holds no teacher token strings; re-extract it with --logits-topk K"
        )
    if requested != "auto":
        return requested, "as asked"
    if same_vocab:
        return "same-vocab", "the teacher and the student share one vocabulary"
    if shared_coverage is not None and shared_coverage >= AUTO_MIN_COVERAGE:
        return "shared-vocab", (
            f"the vocabularies differ; tokens with equal strings keep {shared_coverage:.1%} of the teacher's top-k "
            f"probability mass (coverage >= {AUTO_MIN_COVERAGE:.0%})"
        )
    why = (
        "the cache holds no teacher token strings"
        if shared_coverage is None
        else f"tokens with equal strings keep only {shared_coverage:.1%} of the teacher's top-k mass (coverage)"
    )
    return "uld", f"the vocabularies differ and {why}; ULD compares sorted probabilities, needing no shared tokens"
