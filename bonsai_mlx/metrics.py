"""Answer metrics: VQA-normalised exact match, POPE-style yes/no, ROUGE-L, BLEU-4 and CIDEr-D (pure Python);
METEOR through the reference Java jar that pycocoevalcap ships (the one published numbers come from)."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

from bonsai_mlx.core.errors import UserError

_NUMBERS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:]")
_PERIOD = re.compile(r"(?<!\d)\.(?!\d)")
_COMMA_NUM = re.compile(r"(\d),(\d)")


def vqa_normalize(s: str) -> str:
    """The VQAv2 answer normalisation: case, punctuation, number words, articles, spacing."""
    s = s.replace("\n", " ").replace("\t", " ").strip().lower()
    s = _COMMA_NUM.sub(r"\1\2", s)
    s = _PUNCT.sub(" ", s).replace("'", "")
    s = _PERIOD.sub("", s)
    words = [_NUMBERS.get(w, w) for w in s.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(pred: str, golds: list[str]) -> float:
    """VQA accuracy: min(#humans who gave the answer / 3, 1); with one gold answer, exact match."""
    p = vqa_normalize(pred)
    hits = sum(vqa_normalize(g) == p for g in golds)
    return min(1.0, hits / 3) if len(golds) >= 3 else float(hits > 0)


def yes_no(pred: str) -> str | None:
    w = vqa_normalize(pred).split()
    return w[0] if w and w[0] in ("yes", "no") else None


def pope(preds: list[str], golds: list[str]) -> dict[str, float]:
    """Accuracy, precision/recall/F1 for 'yes', and the share of 'yes' answers."""
    p = [yes_no(x) == "yes" for x in preds]
    g = [yes_no(x) == "yes" for x in golds]
    tp = sum(a and b for a, b in zip(p, g, strict=True))
    fp = sum(a and not b for a, b in zip(p, g, strict=True))
    fn = sum(b and not a for a, b in zip(p, g, strict=True))
    n = len(preds)
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    acc = sum(a == b for a, b in zip(p, g, strict=True)) / n if n else 0.0
    return {
        "accuracy": acc,
        "precision": prec,
        "recall": rec,
        "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
        "yes_ratio": sum(p) / n if n else 0.0,
    }


def _tokens(s: str) -> list[str]:
    return re.findall(r"\w+", s.lower())


def rouge_l(pred: str, ref: str, beta: float = 1.0) -> float:
    """ROUGE-L F-measure from the longest common subsequence of word tokens (beta=1 as rouge-score; COCO uses 1.2)."""
    a, b = _tokens(pred), _tokens(ref)
    if not a or not b:
        return 0.0
    dp = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            cur = dp[j]
            dp[j] = prev + 1 if x == y else max(dp[j], dp[j - 1])
            prev = cur
    lcs = dp[-1]
    if lcs == 0:
        return 0.0
    p, r = lcs / len(a), lcs / len(b)
    return (1 + beta**2) * p * r / (r + beta**2 * p)


def bleu4(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus BLEU-4 (uniform weights, brevity penalty, no smoothing), as in Papineni et al."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for p, rs in zip(preds, refs, strict=True):
        h = _tokens(p)
        toks = [_tokens(r) for r in rs]
        hyp_len += len(h)
        ref_len += min((len(t) for t in toks), key=lambda n: (abs(n - len(h)), n))
        for n in range(1, 5):
            hc = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            best: Counter = Counter()
            for t in toks:
                best |= Counter(tuple(t[i : i + n]) for i in range(len(t) - n + 1))
            match[n - 1] += sum(min(c, best[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    if min(match) == 0 or hyp_len == 0:
        return 0.0
    log_p = sum(math.log(m / t) for m, t in zip(match, total, strict=True)) / 4
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return bp * math.exp(log_p)


def _ngrams(words: list[str], n_max: int = 4) -> Counter:
    return Counter(tuple(words[i : i + n]) for n in range(1, n_max + 1) for i in range(len(words) - n + 1))


def cider_d(preds: list[str], refs: list[list[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (Vedantam et al.): n-gram (1-4) TF-IDF cosine against each reference, the candidate's
    weights clipped to the reference's, a Gaussian length penalty, averaged over references and n, x10.
    Document frequencies come from the references of this eval set, so scores depend on the set. Lengths
    count bigrams, as the COCO caption toolkit does (its numbers are the ones people quote)."""
    if len(preds) != len(refs) or not preds:
        raise ValueError(f"cider_d needs one non-empty reference list per prediction ({len(preds)} vs {len(refs)})")
    cand = [_ngrams(_tokens(p)) for p in preds]
    grams = [[_ngrams(_tokens(r)) for r in rs] for rs in refs]
    df: Counter = Counter(g for rs in grams for g in set().union(*rs))
    log_n = math.log(len(refs))

    def vec(c: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [{} for _ in range(4)]
        for g, tf in c.items():
            v[len(g) - 1][g] = tf * (log_n - math.log(max(1.0, df[g])))
        return v, [math.sqrt(sum(w * w for w in d.values())) for d in v], sum(c[g] for g in c if len(g) == 2)

    total = 0.0
    for c, rs in zip(cand, grams, strict=True):
        vc, nc, lc = vec(c)
        per_ref = 0.0
        for r in rs:
            vr, nr, lr = vec(r)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma**2))
            for n in range(4):
                dot = sum(min(w, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, w in vc[n].items())
                per_ref += (dot / (nc[n] * nr[n]) if nc[n] and nr[n] else dot) * penalty / 4
        total += 10.0 * per_ref / len(rs)
    return total / len(preds)


JAVA_HINT = "install Java (Debian/Ubuntu: apt-get install openjdk-17-jre-headless; or run scripts/setup.sh --dev)"


def meteor_jar() -> Path:
    """pycocoevalcap's meteor-1.5.jar, checked to be runnable here: Java on PATH, the jar and its English
    paraphrase table (data/paraphrase-en.gz) present. Raises a UserError that says what to install."""
    if shutil.which("java") is None:
        raise UserError(f"METEOR runs the reference Java jar and no `java` is on PATH: {JAVA_HINT}")
    try:
        import pycocoevalcap.meteor.meteor as m
    except ImportError:
        raise UserError(
            "METEOR uses the jar inside pycocoevalcap: pip install pycocoevalcap (it is in the dev extra)"
        ) from None
    jar = Path(m.__file__).with_name("meteor-1.5.jar")
    for need in (jar, jar.parent / "data" / "paraphrase-en.gz"):
        if not need.is_file():
            raise UserError(f"METEOR: {need} is missing from the pycocoevalcap install (reinstall pycocoevalcap)")
    return jar


def _meteor_line(s: str) -> str:
    """One line of the jar's text protocol: no newlines, no `|||` field separators."""
    return " ".join(s.replace("|||", " ").split())


def meteor(preds: list[str], refs: list[list[str]]) -> float:
    """Corpus METEOR 1.5 (English, -norm), as the COCO caption toolkit computes it: each hypothesis is scored
    against its references by the jar (`-stdio` protocol: SCORE -> statistics, EVAL -> scores) and the
    statistics are pooled into one corpus score, the jar's "Final score". Starting the jar takes ~10 s."""
    if len(preds) != len(refs) or not preds or not all(refs):
        raise ValueError(f"meteor needs one non-empty reference list per prediction ({len(preds)} vs {len(refs)})")
    jar = meteor_jar()
    cmd = ["java", "-Xmx2G", "-jar", str(jar), "-", "-", "-stdio", "-l", "en", "-norm"]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, cwd=jar.parent, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdin is not None and proc.stdout is not None

        def fail() -> UserError:
            proc.kill()
            proc.wait()
            err.seek(0)
            tail = err.read().decode(errors="replace").strip().splitlines()[-3:]
            return UserError(f"METEOR: the jar {jar} stopped answering: {' / '.join(tail) or 'no message'}")

        def read() -> str:
            out = proc.stdout.readline().decode().strip()
            if not out:
                raise fail()
            return out

        def send(*fields: str) -> None:
            try:
                proc.stdin.write((" ||| ".join(fields) + "\n").encode())
                proc.stdin.flush()
            except BrokenPipeError:
                raise fail() from None

        try:
            stats = []
            for p, rs in zip(preds, refs, strict=True):
                send("SCORE", *(_meteor_line(r) for r in rs), _meteor_line(p))
                stats.append(read())
            send("EVAL", *stats)  # answers one score per segment, then the corpus score
            final = [read() for _ in range(len(preds) + 1)][-1]
        finally:
            if proc.poll() is None:
                proc.stdin.close()
                proc.kill()
                proc.wait()
    return float(final)
