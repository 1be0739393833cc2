import re

import pytest

from bonsai_mlx.metrics import bleu4, cider_d, pope, rouge_l, vqa_accuracy, vqa_normalize


def test_vqa_normalisation():
    assert vqa_normalize("  Two Dogs! ") == "2 dogs"
    assert vqa_normalize("The red square.") == "red square"
    assert vqa_normalize("1,000") == "1000" and vqa_normalize("3.5") == "3.5"
    assert vqa_normalize("top-right") == "top right"


def test_vqa_accuracy_single_and_human_answers():
    assert vqa_accuracy("Two", ["2"]) == 1.0 and vqa_accuracy("three", ["2"]) == 0.0
    assert vqa_accuracy("red", ["red", "red", "blue", "red"]) == 1.0
    assert vqa_accuracy("blue", ["red", "red", "blue", "red"]) == pytest.approx(1 / 3)


def test_pope_by_hand():
    preds = ["Yes", "yes", "no", "no", "Yes, there is."]
    golds = ["yes", "no", "no", "yes", "yes"]
    m = pope(preds, golds)
    # tp=2 (1st, 5th), fp=1 (2nd), fn=1 (4th), tn=1
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(3 / 5) and m["yes_ratio"] == pytest.approx(3 / 5)


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 (the cat on the mat); P=R=5/6
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "x") == 0.0


def test_bleu4_identity_and_by_hand():
    assert bleu4(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    # hyp "a b c d e f" vs ref "a b c d e g": p1=5/6 p2=4/5 p3=3/4 p4=2/3, same length -> BP=1
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu4(["a b c d e f"], [["a b c d e g"]]) == pytest.approx(expected)
    assert bleu4(["x y"], [["a b c d"]]) == 0.0


SENTS = [
    ("a green circle on the left", "a green circle is on the left side"),
    ("three shapes: a red square and two circles", "there are three shapes, a red square and two blue circles"),
    ("yes", "no"),
    ("the yellow triangle is at the top right", "the yellow triangle sits top right"),
]


def test_rouge_l_matches_rouge_score():
    from rouge_score import rouge_scorer

    ref = rouge_scorer.RougeScorer(["rougeL"])
    for p, r in SENTS:
        assert rouge_l(p, r) == pytest.approx(ref.score(r, p)["rougeL"].fmeasure, abs=1e-9)


def test_cider_d_by_hand():
    # Each n-gram occurs in one image's references: idf = log 2 for all; unigram and bigram cosines are 1,
    # there are no 3- or 4-grams, equal lengths: 10 * (1 + 1 + 0 + 0) / 4.
    assert cider_d(["a b", "c d"], [["a b"], ["c d"]]) == pytest.approx(5.0)
    # An n-gram in every image's references carries no weight (idf 0); nothing shared scores 0.
    assert cider_d(["x y", "c d"], [["a b"], ["c d"]]) == pytest.approx(2.5)
    assert cider_d(["a b", "c d"], [["a b", "c d"], ["a b", "c d"]]) == 0.0
    with pytest.raises(ValueError, match="one non-empty reference list per prediction"):
        cider_d(["a"], [])


def test_cider_d_matches_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    preds = ["a red circle at the top left", "two shapes", "a blue square and a green triangle", "yes", "three"]
    refs = [
        ["red circle top left", "a red circle in the top left corner"],
        ["two", "there are two shapes"],
        ["a blue square and a green triangle", "blue square, green triangle"],
        ["yes"],
        ["three shapes", "there are three"],
    ]
    tok = [" ".join(re.findall(r"\w+", s.lower())) for s in preds]
    gts = {i: [" ".join(re.findall(r"\w+", r.lower())) for r in rs] for i, rs in enumerate(refs)}
    theirs, _ = Cider().compute_score(gts, {i: [t] for i, t in enumerate(tok)})
    assert cider_d(preds, refs) == pytest.approx(theirs, rel=1e-9)


def test_bleu4_matches_sacrebleu():
    import sacrebleu

    preds = [p for p, _ in SENTS[:2] + SENTS[3:]]
    refs = [r for _, r in SENTS[:2] + SENTS[3:]]
    ours = bleu4(preds, [[r] for r in refs])
    theirs = (
        sacrebleu.corpus_bleu(
            [" ".join(p.lower().replace(",", " ").replace(":", " ").split()) for p in preds],
            [[" ".join(r.lower().replace(",", " ").replace(":", " ").split()) for r in refs]],
            tokenize="none",
            smooth_method="none",
        ).score
        / 100
    )
    assert ours == pytest.approx(theirs, abs=1e-9)


def test_evaluate_cli_writes_predictions_and_resumes(pico_dir, tmp_path, capsys):
    import json

    from helpers import image

    from bonsai_mlx.evaluate import main

    (tmp_path / "img").mkdir()
    recs = []
    for i, (q, a, t) in enumerate(
        [
            ("Is there a red square?", "yes", "yesno"),
            ("What colour is it?", "red", "colour"),
            ("Is there a circle?", "no", "yesno"),
        ]
    ):
        image(i).save(tmp_path / "img" / f"{i}.png")
        recs.append(
            {
                "id": f"q{i}",
                "image": f"{i}.png",
                "type": t,
                "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
            }
        )
    (tmp_path / "e.json").write_text(json.dumps(recs))
    args = [
        "--model",
        str(pico_dir),
        "--data",
        str(tmp_path / "e.json"),
        "--image-root",
        str(tmp_path / "img"),
        "--out",
        str(tmp_path / "p.jsonl"),
        "--max-tokens",
        "3",
    ]
    assert main([*args, "--limit", "2"]) == 0
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 1 + 2  # the header, then a row per record
    first = (tmp_path / "p.jsonl").read_text()
    assert main(args) == 0
    text = (tmp_path / "p.jsonl").read_text()
    assert text.startswith(first) and len(text.splitlines()) == 1 + 3  # resumed: only the missing one was added
    s = json.loads((tmp_path / "p.summary.json").read_text())
    assert s["n"] == 3 and set(s["vqa_by_type"]) == {"colour", "yesno"} and s["yesno"]["n"] == 2
    assert "| vqa |" in capsys.readouterr().out
    assert "cider" in s

    with pytest.raises(SystemExit) as e:
        main([*args, "--metrics", "vqa,bogus"])
    assert e.value.code == 2 and "unknown 'bogus'" in capsys.readouterr().err


def test_meteor_without_java_says_how_to_install_it(pico_dir, tmp_path, monkeypatch, capsys):
    from bonsai_mlx.evaluate import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no java on it
    with pytest.raises(SystemExit) as e:
        main(["--model", str(pico_dir), "--data", str(tmp_path / "none.json"), "--metrics", "vqa,meteor"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "no `java` is on PATH" in err and "apt-get install openjdk-17-jre-headless" in err


METEOR_CASES = [
    ("a red circle at the top left", ["red circle top left", "a red circle in the top left corner"]),
    ("two shapes", ["two", "there are two shapes"]),
    ("The yellow triangle sits top-right.", ["the yellow triangle is at the top right", "yellow triangle, top right"]),
    ("", ["yes", "no"]),  # an empty answer scores nothing and must not break the protocol
    ("a ||| b\nc", ["a b c", "abc"]),  # the protocol's separators inside an answer are not fields
]


def test_meteor_equals_the_reference_jar(tmp_path):
    """evaluate's METEOR against the jar run on files (its batch mode, not the -stdio protocol ours speaks)."""
    import shutil
    import subprocess

    if shutil.which("java") is None:
        pytest.skip("no `java` on PATH: apt-get install openjdk-17-jre-headless (scripts/setup.sh --dev does)")
    from bonsai_mlx.evaluate import score
    from bonsai_mlx.metrics import meteor_jar

    jar = meteor_jar()
    assert (jar.parent / "data" / "paraphrase-en.gz").stat().st_size > 10_000_000  # the real table, not a stub
    (tmp_path / "hyp.txt").write_text("".join(" ".join(p.replace("|||", " ").split()) + "\n" for p, _ in METEOR_CASES))
    (tmp_path / "ref.txt").write_text("".join(r + "\n" for _, rs in METEOR_CASES for r in rs))
    cmd = ["java", "-Xmx2G", "-jar", str(jar), "hyp.txt", "ref.txt", "-l", "en", "-norm", "-r", "2"]
    ref = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rows = [{"prediction": p, "answers": rs} for p, rs in METEOR_CASES]
    ours = score(rows, ("meteor",))["meteor"]  # while the reference run loads its tables
    out = ref.communicate(timeout=300)[0]
    theirs = float(next(line for line in out.splitlines() if line.startswith("Final score:")).split()[-1])
    assert 0.2 < theirs < 0.9
    assert ours == pytest.approx(theirs, abs=1e-12)
