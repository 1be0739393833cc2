"""evaluate's perplexity: checked against log-probs computed step by step from the model's own logits."""

import json
import math

import mlx.core as mx
import pytest
from helpers import image

from bonsai_mlx.evaluate import main, perplexity


def _records(root):
    """Two typed conversations (2:1 and 1:2 images, one id-less), a question with two reference answers, and a
    text-only record whose id repeats nothing."""
    (root / "img").mkdir(exist_ok=True)
    image(0, (64, 32)).save(root / "img" / "wide.png")
    image(1, (32, 64)).save(root / "img" / "tall.png")
    return [
        {
            "id": "a",
            "image": "wide.png",
            "type": "colour",
            "conversations": [
                {"from": "human", "value": "<image>\nwhat colour is the square?"},
                {"from": "gpt", "value": "red"},
            ],
        },
        {"id": "b", "image": "tall.png", "type": "count", "question": "how many circles?", "answers": ["three", "two"]},
        {
            "type": "colour",
            "conversations": [{"from": "human", "value": "is there a blue triangle?"}, {"from": "gpt", "value": "yes"}],
        },
    ]


def _by_hand(model, proc, question: str, answer: str, img) -> tuple[list[float], int]:
    """Log-probs of the answer tokens (through the end-of-turn token), each from a forward pass over the prefix
    only, and the index of the first answer token in the full sequence."""
    user = {"role": "user", "content": (f"<image>\n{question}" if img is not None else question)}
    prompt = proc.encode_text(proc.render([user], add_generation_prompt=True))
    full = proc.encode_text(proc.render([user, {"role": "assistant", "content": answer}], add_generation_prompt=False))
    assert full[: len(prompt)] == prompt
    end = next(j for j in range(len(prompt), len(full)) if full[j] in proc.stop_ids)
    pv = mx.array(proc.pixel_values([img])) if img is not None else None
    logps = []
    for j in range(len(prompt) - 1, end + 1):  # j = len(prompt) - 1: the prompt's last token, not supervised
        logits = model(mx.array([full[:j]]), pv)[0, -1].astype(mx.float32)
        logps.append((logits - mx.logsumexp(logits)).tolist()[full[j]])
    return logps, len(prompt)


def test_perplexity_by_hand(pico_dir, tmp_path):
    from PIL import Image

    from bonsai_mlx.generate import load

    model, proc = load(str(pico_dir))
    recs = _records(tmp_path)
    cases = {
        "colour": [
            ("what colour is the square?", "red", Image.open(tmp_path / "img" / "wide.png")),
            ("is there a blue triangle?", "yes", None),
        ],
        "count": [
            ("how many circles?", "three", Image.open(tmp_path / "img" / "tall.png")),
            ("how many circles?", "two", Image.open(tmp_path / "img" / "tall.png")),
        ],
    }
    sums: dict[str, tuple[float, int]] = {}
    alt_first, alt_prompt = 0.0, 0.0  # the same, without the first answer token / with the prompt's last token
    for t, items in cases.items():
        s, n = 0.0, 0
        for q, a, img in items:
            logps, _ = _by_hand(model, proc, q, a, img)
            answer = logps[1:]
            assert len(answer) >= 2  # at least one answer token and the end-of-turn token
            s, n = s - sum(answer), n + len(answer)
            alt_first -= sum(answer[1:])
            alt_prompt -= sum(logps)
        sums[t] = (s, n)
    total_s, total_n = sum(s for s, _ in sums.values()), sum(n for _, n in sums.values())
    expected = math.exp(total_s / total_n)

    got = perplexity(model, proc, recs, str(tmp_path / "img"))
    assert got["ppl_tokens"] == total_n and got["ppl_samples"] == 4 and got["ppl_skipped"] == 0
    assert got["ppl"] == pytest.approx(expected, rel=1e-4)
    for t, (s, n) in sums.items():
        assert got["ppl_by_type"][t] == pytest.approx(math.exp(s / n), rel=1e-4)
    # the first answer token counts and the prompt does not: either mistake moves the number well past tolerance
    assert math.exp(alt_first / (total_n - 4)) != pytest.approx(got["ppl"], rel=1e-2)
    assert math.exp(alt_prompt / (total_n + 4)) != pytest.approx(got["ppl"], rel=1e-2)
    # batching (padding, grouping) changes nothing
    one = perplexity(model, proc, recs, str(tmp_path / "img"), batch_size=1)
    assert one["ppl"] == pytest.approx(got["ppl"], rel=1e-5)


def test_perplexity_cli_without_generation(pico_dir, tmp_path, capsys):
    recs = _records(tmp_path)
    recs.append({"id": "gone", "image": "missing.png", "type": "count", "question": "how many?", "answer": "one"})
    (tmp_path / "e.json").write_text(json.dumps(recs))
    out = tmp_path / "p.jsonl"
    args = ["--model", str(pico_dir), "--data", str(tmp_path / "e.json"), "--image-root", str(tmp_path / "img")]
    assert main([*args, "--out", str(out), "--metrics", "ppl"]) == 0
    s = json.loads((tmp_path / "p.summary.json").read_text())
    assert not out.exists()  # perplexity alone answers nothing
    assert set(s["ppl_by_type"]) == {"colour", "count"} and s["ppl_samples"] == 4 and s["ppl_skipped"] == 1
    assert s["ppl"] > 1.0 and "| ppl / count |" in capsys.readouterr().out
    # --perplexity adds it to the answer metrics
    assert main([*args, "--out", str(tmp_path / "q.jsonl"), "--perplexity", "--metrics", "vqa", "--limit", "3"]) == 0
    s2 = json.loads((tmp_path / "q.summary.json").read_text())
    assert "vqa" in s2 and s2["ppl_samples"] == 4 and s2["ppl_skipped"] == 0
