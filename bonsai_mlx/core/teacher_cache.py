"""The teacher hidden-state cache: sharded fp16 safetensors + JSON index + manifest.

Written once on a GPU by `train_cuda.extract`, read by both `train_cuda.distill` and
`bonsai_mlx.train --stage distill` (NumPy only: no torch or mlx needed to read or write it).

    CACHE/manifest.json            teacher (and its depth), layers, normalisation, hidden size, grids, student
                                   tokenizer hash, and the inputs it was made from (data fingerprint, image root,
                                   dtype, 4-bit): a resume with other inputs is refused, and so is a trainer whose
                                   --data or --image-root differ (`CacheReader.check_data`)
    CACHE/shard-00000.safetensors  "<id>/text/<layer>" (units, D) and "<id>/image/<layer>" (grid^2, D)
    CACHE/shard-00000.json         {"planned": ids the shard was meant to hold, "entries": <id> -> positions
                                   of the text units and "ids": [n, digest of the student's first n token ids]};
                                   written last, it marks the shard done for those ids. Shards are never deleted:
                                   a smaller --max-samples reads what it plans, a new cache needs --overwrite
    CACHE/pca.safetensors          with --pca K: per layer mean and K components; shards then hold K-dim
                                   coordinates and the reader maps them back to the hidden size
    CACHE/teacher_tokens.json      with --logits-topk K (format 3): the string each teacher token id stands for
                                   (bonsai_mlx.core.vocab_map.encode_tokens), so cross-tokenizer logit losses
                                   need nothing but the cache; shards then also hold "<id>/topk_ids",
                                   "<id>/topk_logits" and "<id>/topk_lse" (k ids, logits, and the logsumexp over
                                   the whole vocabulary) at every aligned text unit and at the last prompt
                                   token before each answer
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bonsai_mlx.core.errors import InputNotFound, UserError
from bonsai_mlx.core.io import atomic_write_text

FORMAT = 2  # written when the cache holds no cross-tokenizer logits (readers since format 2 read it)
FORMAT_LOGITS = 3  # with manifest["logits"]: top-k at every aligned unit, teacher token strings
READS = (1, 2, 3)  # format 1: shard .json = the entries alone, no planned ids (read, never resumed)
TOKENS_FILE = "teacher_tokens.json"
# Manifest entries that describe a run, not the cache's identity: they may change between an extraction and its
# resume (shards planned with fewer ids are redone with more; none is ever deleted).
RESUMABLE = ("max_samples", "data_path", "samples", "shards")
# The files a cache consists of (what --overwrite removes, and nothing else).
CACHE_FILES = ("manifest.json", "shard-*.safetensors", "shard-*.json", "pca.safetensors", TOKENS_FILE, ".*.tmp*")


def tokenizer_fingerprint(tok, chat_template: str | None = None) -> str:
    """Changes whenever token ids would: vocabulary, added tokens and the chat template in use (pass the one
    the processor renders with, e.g. from chat_template.jinja, when the tokenizer does not carry it)."""
    h = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update((chat_template or tok.chat_template or "").encode())
    return h.hexdigest()[:16]


def vocab_fingerprint(tok) -> str:
    """Equal exactly when two tokenizers map the same strings to the same ids (logits are comparable)."""
    return hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()[:16]


@dataclass
class Entry:
    text_student_pos: list[int]
    text_teacher_pos: list[int]
    text: dict[int, np.ndarray]  # layer -> (units, D)
    image: dict[int, np.ndarray]  # layer -> (student_grid^2, D), empty for text-only samples
    # with --logits-topk: the teacher's top-k next-token logits at logit units (format 3: every aligned text unit,
    # then the last prompt token before each answer, at these positions; format 2: `kl_units`, indices into the
    # text units whose next token is the same in both tokenizations)
    kl_units: list[int] = field(default_factory=list)
    topk_ids: np.ndarray | None = None  # (units, k) int32
    topk_logits: np.ndarray | None = None  # (units, k)
    topk_lse: np.ndarray | None = None  # (units,) logsumexp of all the teacher's logits (format 3)
    # indices of the logit units whose next token is the same in both tokenizations (where ids compare in the
    # same-vocab mode); None: all of them (format 2 stored only those)
    same_next: list[int] | None = None
    kl_student_pos: list[int] | None = None
    kl_teacher_pos: list[int] | None = None
    # indices of the logit units where the teacher's next token carries a space the student's does not (an
    # answer start after "ASSISTANT:"): its strings compare without that leading space
    strip_space: list[int] = field(default_factory=list)
    # (n, digest of the student's first n token ids) the targets were aligned to (provenance.ids_check)
    ids_check: tuple[int, str] | None = None

    def logit_student_pos(self) -> list[int]:
        """Student positions of the logit units, whichever format stored them."""
        if self.kl_student_pos is not None:
            return self.kl_student_pos
        return [self.text_student_pos[k] for k in self.kl_units]


class PcaFit:
    """Streaming PCA of one layer's states: accumulates sums, then eigendecomposes the covariance."""

    def __init__(self, dim: int):
        self.n, self.sum, self.outer = 0, np.zeros(dim), np.zeros((dim, dim))

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, np.float64)
        self.n += len(x)
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def finish(self, k: int) -> tuple[np.ndarray, np.ndarray, float]:
        """(mean (D,), components (k, D), share of variance the k components keep)."""
        if self.n < 2:
            raise UserError("PCA needs states from at least two units: add more --pca-samples")
        mean = self.sum / self.n
        cov = self.outer / self.n - np.outer(mean, mean)
        val, vec = np.linalg.eigh(cov)
        order = np.argsort(val)[::-1][:k]
        kept = float(val[order].clip(0).sum() / max(val.clip(0).sum(), 1e-12))
        return mean.astype(np.float32), vec[:, order].T.astype(np.float32), kept


class CacheWriter:
    """Accumulates samples and writes a shard every `per_shard` of them, atomically."""

    def __init__(self, root: str | Path, manifest: dict, per_shard: int = 256, overwrite: bool = False):
        """Open (resume) or start the cache at `root`. A cache made from other inputs is refused in one line
        unless `overwrite`, which removes that cache's files (and only those) first."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        mpath = self.root / "manifest.json"
        manifest = full_manifest(manifest, per_shard)
        if check_resume(self.root, manifest, overwrite):
            clear_cache(self.root)
        elif mpath.is_file():
            old = json.loads(mpath.read_text())
            manifest["max_samples"] = _wider(old.get("max_samples"), manifest.get("max_samples"))
        if not mpath.is_file() or json.loads(mpath.read_text()) != manifest:
            atomic_write_text(mpath, json.dumps(manifest, indent=2))
        self.manifest = manifest
        self.per_shard = per_shard
        self.basis = _read_basis(self.root) if manifest.get("pca") else None

    def load_basis(self) -> None:
        """Read the PCA basis another process wrote (ranks other than 0)."""
        self.basis = _read_basis(self.root)

    def update_manifest(self, **extra) -> None:
        """Add run facts (sample count, completeness) to the manifest, atomically."""
        self.manifest = {**self.manifest, **extra}
        atomic_write_text(self.root / "manifest.json", json.dumps(self.manifest, indent=2))

    def shard_bytes(self) -> int:
        """Bytes the cache's shards take now (what a resume need not write again)."""
        return sum(p.stat().st_size for p in self.root.glob("shard-*.safetensors"))

    def write_tokens(self, tokens: list, byte_fallback: list[int] | None = None) -> None:
        """The teacher's token strings (`vocab_map.encode_tokens`) and the ids of its byte-fallback pieces, once
        per cache, atomically."""
        doc = {"tokens": tokens, "byte_fallback": sorted(byte_fallback or [])}
        atomic_write_text(self.root / TOKENS_FILE, json.dumps(doc))

    def has_basis(self) -> bool:
        return self.basis is not None

    def set_basis(self, basis: dict[int, tuple[np.ndarray, np.ndarray]]) -> None:
        """Store the PCA basis (written before any shard); later shards hold coordinates in it."""
        from safetensors.numpy import save_file

        tensors = {}
        for layer, (mean, comps) in basis.items():
            tensors[f"mean/{layer}"], tensors[f"components/{layer}"] = mean, comps
        tmp = self.root / ".pca.tmp.safetensors"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.root / "pca.safetensors")
        self.basis = basis

    def _store(self, a: np.ndarray, layer: int) -> np.ndarray:
        if self.basis is not None:
            mean, comps = self.basis[layer]
            a = (np.asarray(a, np.float32) - mean) @ comps.T
        return np.ascontiguousarray(a, dtype=np.float16)

    def shard_done(self, k: int, planned: list[str]) -> bool:
        """Shard k already holds every one of these sample ids (it may hold more: a smaller --max-samples reads
        what it plans and leaves the rest; one planned with fewer ids is redone with all of them)."""
        path = self.root / f"shard-{k:05d}.json"
        if not path.is_file():
            return False
        index = json.loads(path.read_text())
        return isinstance(index.get("planned"), list) and set(planned) <= set(index["planned"])

    def pack(self, sid: str, e: Entry) -> tuple[dict[str, np.ndarray], dict]:
        """One sample as it is stored (fp16 or PCA coordinates): a shard is buffered in this form, never in
        float32."""
        if self.manifest.get("pca") and self.basis is None:
            raise ValueError(f"{self.root}: a PCA cache needs its basis (set_basis) before the first shard")
        tensors = {}
        for layer, a in e.text.items():
            tensors[f"{sid}/text/{layer}"] = self._store(a, layer)
        for layer, a in e.image.items():
            tensors[f"{sid}/image/{layer}"] = self._store(a, layer)
        meta = {"text_student_pos": e.text_student_pos, "text_teacher_pos": e.text_teacher_pos}
        if e.ids_check is not None:
            meta["ids"] = list(e.ids_check)
        if e.topk_ids is not None:
            if e.kl_student_pos is not None:
                meta["kl_pos"], meta["kl_teacher_pos"] = e.kl_student_pos, e.kl_teacher_pos
                meta["strip_space"] = e.strip_space
            else:
                meta["kl_units"] = e.kl_units
            if e.same_next is not None:
                meta["same_next"] = e.same_next
            tensors[f"{sid}/topk_ids"] = np.ascontiguousarray(e.topk_ids, dtype=np.int32)
            tensors[f"{sid}/topk_logits"] = np.ascontiguousarray(e.topk_logits, dtype=np.float16)
            if e.topk_lse is not None:
                tensors[f"{sid}/topk_lse"] = np.ascontiguousarray(e.topk_lse, dtype=np.float32)
        return tensors, meta

    def write_shard(self, k: int, entries: dict[str, Entry], planned: list[str] | None = None) -> None:
        """Write shard k; `planned` = every id it was meant to hold (skipped ones included), for resume."""
        self.write_packed(k, {sid: self.pack(sid, e) for sid, e in entries.items()}, planned)

    def write_packed(self, k: int, packed: dict[str, tuple[dict, dict]], planned: list[str] | None = None) -> None:
        """Write shard k from `pack`ed samples: tensors via a temp file and rename, then its index (last)."""
        from safetensors.numpy import save_file

        tensors, index = {}, {}
        for sid, (t, meta) in packed.items():
            tensors.update(t)
            index[sid] = meta
        name = f"shard-{k:05d}"
        tmp = self.root / f".{name}.tmp.safetensors"
        save_file(tensors, str(tmp))
        os.replace(tmp, self.root / f"{name}.safetensors")
        planned = list(packed) if planned is None else list(planned)
        atomic_write_text(self.root / f"{name}.json", json.dumps({"planned": planned, "entries": index}))


def full_manifest(manifest: dict, per_shard: int) -> dict:
    """A manifest as the writer stores it (format and shard size first)."""
    fmt = FORMAT_LOGITS if manifest.get("logits") else FORMAT
    return {"format": fmt, "samples_per_shard": per_shard, **manifest}


def check_resume(root: str | Path, manifest: dict, overwrite: bool = False) -> bool:
    """Whether the cache at `root` must be replaced: refuses (one line) a cache made from other inputs unless
    `overwrite`; False when there is none or it is this one (a resume). Reads only; safe on every rank."""
    mpath = Path(root) / "manifest.json"
    if not mpath.is_file():
        return False
    old = json.loads(mpath.read_text())
    diff = identity_diff(old, manifest)
    if diff and not overwrite:
        k = diff[0]
        raise UserError(
            f"{mpath}: existing cache was made with different {k!r} ({old.get(k)!r}, now {manifest.get(k)!r}); "
            "use a new --out, or --overwrite to replace it"
        )
    return bool(diff)


def identity_diff(old: dict, new: dict) -> list[str]:
    """Manifest keys whose values make two caches different (run facts and the data's path excluded)."""
    from bonsai_mlx.core.provenance import same_data

    diff = []
    for k in sorted(set(old) | set(new)):
        if k in RESUMABLE:
            continue
        if k == "data" and same_data(old.get(k), new.get(k)):
            continue
        if old.get(k) != new.get(k):
            diff.append(k)
    return diff


def clear_cache(root: Path) -> None:
    """Remove a cache's own files (--overwrite); other files in the folder are left alone."""
    for pattern in CACHE_FILES:
        for p in root.glob(pattern):
            if p.is_file():
                p.unlink()


def _wider(a: int | None, b: int | None) -> int | None:
    """The --max-samples a cache covers after runs with a and b (None: all)."""
    return None if a is None or b is None else max(a, b)


def as_stored(e: Entry) -> Entry:
    """An entry as a (non-PCA) cache gives it back: states and top-k logits in float16, ids int32, logsumexp
    float32. The online teacher returns this, so both modes feed the loss the same numbers."""
    import copy

    out = copy.copy(e)
    out.text = {L: np.ascontiguousarray(a, dtype=np.float16) for L, a in e.text.items()}
    out.image = {L: np.ascontiguousarray(a, dtype=np.float16) for L, a in e.image.items()}
    if e.topk_ids is not None:
        out.topk_ids = np.ascontiguousarray(e.topk_ids, dtype=np.int32)
        out.topk_logits = np.ascontiguousarray(e.topk_logits, dtype=np.float16)
        out.topk_lse = None if e.topk_lse is None else np.ascontiguousarray(e.topk_lse, dtype=np.float32)
    return out


class CacheReader:
    def __init__(self, root: str | Path, student_tokenizer=None, chat_template: str | None = None):
        self.root = Path(root)
        mpath = self.root / "manifest.json"
        if not mpath.is_file():
            raise InputNotFound(f"{mpath}: not found (make the cache with python -m train_cuda.extract)")
        self.manifest = json.loads(mpath.read_text())
        if self.manifest.get("format") not in READS:
            raise UserError(
                f"{mpath}: cache format {self.manifest.get('format')!r}, this version reads formats "
                f"{', '.join(map(str, READS))}; re-extract the cache or update bonsai_mlx"
            )
        if student_tokenizer is not None:
            fp = tokenizer_fingerprint(student_tokenizer, chat_template)
            if fp != self.manifest["student_tokenizer"]:
                raise UserError(
                    f"{self.root}: cache was aligned to a different student tokenizer "
                    f"({self.manifest['student_tokenizer']} != {fp}); "
                    "re-extract with --student-tokenizer for this model"
                )
        self.layers = [int(x) for x in self.manifest["layers"]]
        self.where: dict[str, tuple[Path, dict]] = {}
        for j in sorted(self.root.glob("shard-*.json")):
            index = json.loads(j.read_text())
            if self.manifest["format"] >= 2:
                index = index["entries"]
            for sid, meta in index.items():
                self.where[sid] = (j.with_suffix(".safetensors"), meta)
        self._open: dict[Path, object] = {}
        self.basis = _read_basis(self.root) if self.manifest.get("pca") else None
        if self.manifest.get("pca") and self.basis is None:
            raise UserError(f"{self.root}: manifest says PCA but pca.safetensors is missing")

    def __contains__(self, sid: str) -> bool:
        return sid in self.where

    def __len__(self) -> int:
        return len(self.where)

    def get(self, sid: str) -> Entry:
        from safetensors import safe_open

        path, meta = self.where[sid]
        f = self._open.get(path) or self._open.setdefault(path, safe_open(str(path), "np"))
        keys = set(f.keys())
        text = {L: f.get_tensor(f"{sid}/text/{L}") for L in self.layers if f"{sid}/text/{L}" in keys}
        image = {L: f.get_tensor(f"{sid}/image/{L}") for L in self.layers if f"{sid}/image/{L}" in keys}
        if self.basis is not None:  # back from PCA coordinates to the teacher's hidden size
            text = {L: self._expand(a, L) for L, a in text.items()}
            image = {L: self._expand(a, L) for L, a in image.items()}
        e = Entry(meta["text_student_pos"], meta["text_teacher_pos"], text, image)
        if "ids" in meta:
            e.ids_check = (int(meta["ids"][0]), str(meta["ids"][1]))
        if "kl_units" in meta or "kl_pos" in meta:
            e.kl_units = meta.get("kl_units", [])
            e.kl_student_pos, e.kl_teacher_pos = meta.get("kl_pos"), meta.get("kl_teacher_pos")
            e.same_next, e.strip_space = meta.get("same_next"), meta.get("strip_space", [])
            e.topk_ids, e.topk_logits = f.get_tensor(f"{sid}/topk_ids"), f.get_tensor(f"{sid}/topk_logits")
            if f"{sid}/topk_lse" in keys:
                e.topk_lse = f.get_tensor(f"{sid}/topk_lse")
        return e

    def check_data(self, data: str | Path, image_root: str | Path | None) -> str | None:
        """Refuse (one line) a cache made from other data or another image root than a trainer's --data and
        --image-root: the same records under other ids, or other images, would train toward wrong targets.
        Returns a note when the cache is too old to tell (no fingerprint recorded)."""
        from bonsai_mlx.core.provenance import data_fingerprint, describe_data, same_data

        made = self.manifest.get("data")
        if not made:
            return f"{self.root}: the cache records no data fingerprint (made before they were); not checked"
        now = data_fingerprint(data)
        if not same_data(made, now):
            raise UserError(
                f"{self.root}: the cache was made from other data ({describe_data(made)}), --data {data} is "
                f"{describe_data(now)}; re-extract for this data or pass the data it was made from"
            )
        root = str(Path(image_root).resolve()) if image_root else None
        if "image_root" in self.manifest and self.manifest["image_root"] != root:
            raise UserError(
                f"{self.root}: the cache was made with --image-root {self.manifest['image_root']}, this run has "
                f"{root}; pass the same image root or re-extract"
            )
        return None

    def check_samples(self, samples) -> int:
        """Refuse (one line) when a sample's student token ids are not those its targets were aligned to (an
        edited record). `samples`: (id, student ids) pairs, ids as the trainer built them (truncated ones too).
        Returns how many could be checked (a sample cut before its last target position, or from a cache
        without digests, cannot be)."""
        from bonsai_mlx.core.provenance import ids_digest

        checked, bad = 0, []
        for sid, ids in samples:
            if sid not in self.where:
                continue
            ref = self.where[sid][1].get("ids")
            if ref is None or len(ids) < ref[0]:
                continue
            checked += 1
            if ids_digest(list(ids)[: ref[0]]) != ref[1]:
                bad.append(sid)
        if bad:
            raise UserError(
                f"{self.root}: {len(bad)} sample(s) differ from the records the cache was made from (e.g. "
                f"{bad[0]!r}: other student tokens); re-extract, or restore the data the cache was made from"
            )
        return checked

    @property
    def logits_topk(self) -> int:
        """k of the stored teacher top-k logits (0: none); format-2 caches named it kl_topk."""
        return int((self.manifest.get("logits") or {}).get("topk") or self.manifest.get("kl_topk") or 0)

    def teacher_tokens(self) -> tuple[list[bytes | None], set[int]] | None:
        """(the bytes each teacher token id stands for, ids of its byte-fallback pieces); None when the cache
        predates them (format 2)."""
        from bonsai_mlx.core.vocab_map import decode_tokens

        if not self.manifest.get("logits"):
            return None
        path = self.root / TOKENS_FILE
        if not path.is_file():
            raise UserError(f"{path}: missing (the manifest says the cache holds teacher logits); re-extract it")
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
            items, fallback = doc["tokens"], doc.get("byte_fallback", [])
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: expected a JSON object with a 'tokens' list ({e})") from None
        if not isinstance(items, list) or not all(isinstance(i, int) for i in fallback):
            raise UserError(f"{path}: 'tokens' must be a list and 'byte_fallback' a list of token ids")
        return decode_tokens(items, str(path)), set(fallback)

    def _expand(self, a: np.ndarray, layer: int) -> np.ndarray:
        mean, comps = self.basis[layer]
        return a.astype(np.float32) @ comps + mean


def _read_basis(root: Path) -> dict[int, tuple[np.ndarray, np.ndarray]] | None:
    path = root / "pca.safetensors"
    if not path.is_file():
        return None
    from safetensors.numpy import load_file

    t = load_file(str(path))
    layers = sorted({int(k.split("/")[1]) for k in t})
    return {L: (t[f"mean/{L}"], t[f"components/{L}"]) for L in layers}


class MemoryCache:
    """What `CacheReader` offers, held in memory: the online teacher's targets for one batch (or for a sample of
    records, for `plan_logits`), so `gather_targets`, `plan_logits` and `cache_layer_map` read both modes alike.
    A sample without targets (its record could not be aligned) reads as an entry with no units."""

    def __init__(self, manifest: dict, entries: dict[str, Entry], tokens=None, root: str = "online teacher"):
        self.root, self.manifest, self.where, self._tokens = root, manifest, entries, tokens
        self.layers = [int(x) for x in manifest["layers"]]

    def __contains__(self, sid: str) -> bool:
        return sid in self.where

    def __len__(self) -> int:
        return len(self.where)

    def get(self, sid: str) -> Entry:
        if sid in self.where:
            return self.where[sid]
        empty = np.zeros((0, int(self.manifest["hidden_size"])), np.float16)
        return Entry([], [], {L: empty for L in self.layers}, {})

    @property
    def logits_topk(self) -> int:
        return int((self.manifest.get("logits") or {}).get("topk") or 0)

    def teacher_tokens(self):
        return self._tokens if self.manifest.get("logits") else None
