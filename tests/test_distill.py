import json
import os

import mlx.core as mx
import numpy as np
import pytest

from bonsai_mlx.core.distill_targets import parse_layer_map
from bonsai_mlx.distill import Aligners, alpha_at, distance, feature_loss

# Exactness checks compare float32 with float32: MLX's CUDA backend would do float32 matmuls in TF32 (~1e-3
# relative) unless told not to. MLX reads this once per process, at its first matmul, after collection.
os.environ["MLX_ENABLE_TF32"] = "0"


def _inputs(rng):
    states = {-1: rng.normal(size=(2, 7, 16)).astype(np.float32), 2: rng.normal(size=(2, 7, 16)).astype(np.float32)}
    d = {"text_pos": np.array([1, 3, 9], np.int32), "image_pos": np.array([0, 2, 7, 8], np.int32)}
    for t in (-1, 5):
        d[f"text_{t}"] = rng.normal(size=(3, 24)).astype(np.float32)
        d[f"image_{t}"] = rng.normal(size=(4, 24)).astype(np.float32)
    return states, d


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_feature_loss_is_the_same_number_in_mlx_and_pytorch(kind):
    import torch

    from train_cuda import losses

    rng = np.random.default_rng(0)
    states, d = _inputs(rng)
    pairs = [(-1, -1), (5, 2)]
    ours = Aligners(pairs, 16, 24)
    theirs = losses.Aligners(pairs, 16, 24)
    with torch.no_grad():
        for i in range(2):
            theirs.proj[i].weight.copy_(torch.tensor(np.array(ours.proj[i].weight)))
            theirs.proj[i].bias.copy_(torch.tensor(np.array(ours.proj[i].bias)))
    a = feature_loss(ours, {k: mx.array(v) for k, v in states.items()}, {k: mx.array(v) for k, v in d.items()}, kind)
    b = losses.feature_loss(
        theirs, {k: torch.tensor(v) for k, v in states.items()}, {k: torch.tensor(v) for k, v in d.items()}, kind
    )
    assert abs(a.item() - b.item()) < 1e-5 and a.item() > 0
    ce = 2.5
    assert abs(alpha_at(0.5, 0.1, 0.25) - 0.4) < 1e-9
    t = losses.distill_loss(torch.tensor(ce), b, 0.5, 0.1, 0.25).item()
    assert abs(t - ((1 - 0.4) * ce + 0.4 * a.item())) < 1e-5


def test_cosine_distance_ignores_scale_and_mse_does_not():
    x = mx.array(np.random.default_rng(0).normal(size=(5, 8)).astype(np.float32))
    assert distance(x, 3 * x, "cosine").item() < 1e-6
    assert abs(distance(x, -x, "cosine").item() - 2.0) < 1e-6
    assert distance(x, 3 * x, "mse").item() > 1.0
    with pytest.raises(ValueError, match="feature loss must be one of mse, cosine"):
        distance(x, x, "l1")


def test_pytorch_distance_refuses_an_unknown_feature_loss_as_mlx_does():
    import torch

    from train_cuda.losses import distance as torch_distance

    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match="feature loss must be one of mse, cosine"):
        torch_distance(x, x, "l1")


def test_kl_loss_matches_pytorch_and_the_exact_kl():
    import torch

    from bonsai_mlx.distill import kl_loss
    from train_cuda import losses

    rng = np.random.default_rng(1)
    student = rng.normal(size=(6, 20)).astype(np.float32)
    teacher = rng.normal(size=(6, 20)).astype(np.float32)
    ids = np.argsort(-teacher, axis=-1)[:, :5].astype(np.int32)
    top = np.take_along_axis(teacher, ids, -1)
    for temp in (1.0, 2.0):
        a = kl_loss(mx.array(student), mx.array(top), mx.array(ids), temp).item()
        b = losses.kl_loss(torch.tensor(student), torch.tensor(top), torch.tensor(ids), temp).item()
        assert abs(a - b) < 1e-5 and a > 0
    # with every token kept it is the textbook KL(p || q)
    full = np.tile(np.arange(20, dtype=np.int32), (6, 1))
    p = np.exp(teacher - teacher.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(student - student.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    exact = (p * (np.log(p) - np.log(q))).sum(-1).mean()
    assert abs(kl_loss(mx.array(student), mx.array(teacher), mx.array(full)).item() - exact) < 1e-5
    assert abs(kl_loss(mx.array(teacher), mx.array(teacher), mx.array(full)).item()) < 1e-6


def _uld_case():
    """Two units, teacher top-2 and a 3-token student, with the ULD value worked out by hand."""
    teacher = np.log(np.array([[3.0, 1.0], [1.0, 1.0]], np.float32))  # p = [.75, .25], [.5, .5]
    student = np.log(np.array([[1.0, 2.0, 1.0], [8.0, 1.0, 1.0]], np.float32))  # q = [.25, .5, .25], [.8, .1, .1]
    # sorted top-2 of q: [.5, .25] and [.8, .1]: |.75 - .5| + |.25 - .25| = .25; |.5 - .8| + |.5 - .1| = .7
    return student, teacher, (0.25 + 0.7) / 2


def test_uld_loss_is_the_hand_computed_value_in_mlx_and_pytorch():
    import torch

    from bonsai_mlx.distill import uld_loss
    from train_cuda import losses

    student, teacher, expect = _uld_case()
    a = uld_loss(mx.array(student), mx.array(teacher)).item()
    b = losses.uld_loss(torch.tensor(student), torch.tensor(teacher)).item()
    print(f"ULD hand case: mlx {a:.8f} pytorch {b:.8f} expected {expect:.8f}")
    assert abs(a - expect) < 1e-6 and abs(b - expect) < 1e-6
    # the teacher's order does not matter (it is sorted), and a student vocabulary smaller than k pads with zeros
    assert abs(uld_loss(mx.array(student), mx.array(teacher[:, ::-1].copy())).item() - expect) < 1e-6
    small = np.log(np.array([[1.0, 1.0]], np.float32))
    wide = np.log(np.array([[2.0, 1.0, 1.0]], np.float32))  # p = [.5, .25, .25] vs q = [.5, .5, 0]
    assert abs(uld_loss(mx.array(small), mx.array(wide)).item() - 0.5) < 1e-6
    assert abs(losses.uld_loss(torch.tensor(small), torch.tensor(wide)).item() - 0.5) < 1e-6


def _shared_case():
    """One unit: teacher top-3 p = [.5, .3, .2] whose 2nd token the student lacks; student over 4 tokens, of which
    ids 0, 2, 3 are shared. Teacher renormalised over its shared tokens: [5/7, 2/7] at student ids 2 and 0;
    student renormalised over {0, 2, 3}: q(0) = .25, q(2) = .5."""
    teacher = np.log(np.array([[5.0, 3.0, 2.0]], np.float32))
    sids = np.array([[2, -1, 0]], np.int32)
    student = np.log(np.array([[1.0, 4.0, 2.0, 1.0]], np.float32))
    shared = np.array([0, 2, 3], np.int32)
    expect = 5 / 7 * np.log((5 / 7) / 0.5) + 2 / 7 * np.log((2 / 7) / 0.25)
    return student, teacher, sids, shared, expect


def test_shared_vocab_kl_is_the_hand_computed_value_in_mlx_and_pytorch():
    import torch

    from bonsai_mlx.distill import shared_kl_loss
    from train_cuda import losses

    student, teacher, sids, shared, expect = _shared_case()
    a = shared_kl_loss(mx.array(student), mx.array(teacher), mx.array(sids), mx.array(shared)).item()
    b = losses.shared_kl_loss(
        torch.tensor(student), torch.tensor(teacher), torch.tensor(sids), torch.tensor(shared)
    ).item()
    print(f"shared-vocab KL hand case: mlx {a:.8f} pytorch {b:.8f} expected {expect:.8f}")
    assert abs(a - expect) < 1e-6 and abs(b - expect) < 1e-6
    # a student that puts the teacher's renormalised distribution on the shared tokens scores 0
    match = np.log(np.array([[2.0, 100.0, 5.0, 1e-9]], np.float32))
    assert abs(shared_kl_loss(mx.array(match), mx.array(teacher), mx.array(sids), mx.array(shared)).item()) < 1e-6


@pytest.mark.parametrize("mode", ["same-vocab", "uld", "shared-vocab"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_logit_loss_and_its_gradient_are_the_same_in_mlx_and_pytorch(mode, temperature):
    """Random units over a 50-token student: value and d loss / d student logits agree to float32 precision."""
    import torch

    from bonsai_mlx.core.distill_targets import LogitPlan
    from bonsai_mlx.distill import logit_loss
    from train_cuda import losses

    rng = np.random.default_rng(3)
    student = (2 * rng.normal(size=(7, 50))).astype(np.float32)
    full = (2 * rng.normal(size=(7, 60))).astype(np.float32)
    ids = np.argsort(-full, axis=-1)[:, :6].astype(np.int32)
    d = {"kl_logits": np.take_along_axis(full, ids, -1), "kl_ids": ids % 50}
    d["kl_sids"] = np.where(ids % 3 == 0, -1, ids % 40).astype(np.int32)
    d["kl_sids"][:, 0] = 7  # every unit keeps a shared token
    shared = np.arange(40, dtype=np.int32)
    plan = LogitPlan(mode, "test")

    def f(x):
        return logit_loss(plan, x, {k: mx.array(v) for k, v in d.items()}, temperature, mx.array(shared))

    a, ga = mx.value_and_grad(f)(mx.array(student))
    x = torch.tensor(student, requires_grad=True)
    b = losses.logit_loss(mode, x, {k: torch.tensor(v) for k, v in d.items()}, temperature, torch.tensor(shared))
    b.backward()
    print(f"{mode} T={temperature}: mlx {a.item():.8f} pytorch {b.item():.8f}")
    assert a.item() > 0 and abs(a.item() - b.item()) < 1e-5 * max(1.0, abs(b.item()))
    np.testing.assert_allclose(np.array(ga), x.grad.numpy(), atol=1e-6)


def test_layer_map():
    assert parse_layer_map("-1:-1,16:12", [-1, 16], 24) == [(-1, -1), (16, 12)]
    assert parse_layer_map(None, [-1, 16], 24, 32) == [(-1, -1), (16, 12)]
    assert parse_layer_map(None, [-2], 24, 32) == [(-2, 23)]  # hidden_states[-2] = layer 31 of 32
    with pytest.raises(ValueError, match="cache holds"):
        parse_layer_map("8:4", [-1, 16], 24)
    with pytest.raises(ValueError, match="does not record the teacher's depth"):
        parse_layer_map(None, [-1, 16], 24)  # not silently 16 -> 16


def test_the_default_layer_map_comes_from_the_teachers_depth_in_the_cache(tmp_path):
    """LLaVA-1.5-7B (32 layers) cached at -1,16 distils into a 24-layer student at -1 and 12."""
    from bonsai_mlx.core.distill_targets import cache_layer_map
    from bonsai_mlx.core.teacher_cache import CacheReader, CacheWriter

    manifest = {"teacher": "t", "teacher_layers": 32, "layers": [-1, 16], "hidden_size": 8, "student_tokenizer": "x"}
    CacheWriter(tmp_path, manifest)
    assert cache_layer_map(None, CacheReader(tmp_path), 24) == [(-1, -1), (16, 12)]
    assert cache_layer_map("16:3", CacheReader(tmp_path), 24) == [(16, 3)]
    CacheWriter(tmp_path / "g", {**manifest, "student_grid": 14})
    assert cache_layer_map(None, CacheReader(tmp_path / "g"), 24, 14) == [(-1, -1), (16, 12)]
    with pytest.raises(ValueError, match="14x14 student grid, this student has 16x16"):
        cache_layer_map(None, CacheReader(tmp_path / "g"), 24, 16)


def test_image_targets_of_a_default_strategy_student_skip_the_patch_it_drops():
    """A "default" student drops patch 0 (HF Llava drops the first token, and SigLIP has no CLS): its g*g - 1
    image tokens show patches 1..g*g-1, so their targets are the cache's units 1..g*g-1, not 0..g*g-2."""
    from bonsai_mlx.core.batching import Batch
    from bonsai_mlx.core.distill_targets import gather_targets
    from bonsai_mlx.core.teacher_cache import Entry

    g, img = 3, 99
    units = np.arange(g * g, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    entry = Entry([g * g + 1], [0], {-1: np.zeros((1, 4), np.float32)}, {-1: units})
    cache = type("C", (), {"get": lambda self, sid: entry, "manifest": {}})()
    ids = np.array([[1] + [img] * (g * g - 1) + [5, 6]], np.int32)
    d = gather_targets(cache, Batch(ids, None, np.zeros(0), np.zeros(0), ["a"], ids.size), img, [-1])
    np.testing.assert_array_equal(d["image_-1"][:, 0], np.arange(1, g * g))
    np.testing.assert_array_equal(d["image_pos"], np.arange(1, g * g))


def test_targets_per_mode_same_next_units_for_same_vocab_and_student_ids_for_shared_vocab():
    """same-vocab uses only units whose next token is shared; uld every unit; shared-vocab maps the teacher's ids
    to the student's, drops a unit with no shared token and reports the top-k mass kept."""
    from bonsai_mlx.core.batching import Batch
    from bonsai_mlx.core.distill_targets import LogitPlan, gather_targets
    from bonsai_mlx.core.teacher_cache import Entry
    from bonsai_mlx.core.vocab_map import SharedVocab

    logits = np.log(np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1], [0.9, 0.05, 0.05]], np.float32))
    ids = np.array([[1, 2, 3], [2, 0, 1], [0, 2, 0]], np.int32)
    entry = Entry([1, 2, 3], [0, 1, 2], {-1: np.zeros((3, 4), np.float32)}, {}, [0, 1, 2], ids, logits)
    entry.same_next = [0, 2]
    cache = type("C", (), {"get": lambda self, sid: entry, "logits_topk": 3})()
    batch = Batch(np.zeros((1, 6), np.int32), None, np.zeros(0), np.zeros(0), ["a"], 6)
    same = gather_targets(cache, batch, 99, [-1], LogitPlan("same-vocab", ""))
    np.testing.assert_array_equal(same["kl_pos"], [1, 3])
    uld = gather_targets(cache, batch, 99, [-1], LogitPlan("uld", ""))
    np.testing.assert_array_equal(uld["kl_pos"], [1, 2, 3])
    shared = SharedVocab(np.array([1, 3]), np.array([10, 11]), 4, 2)  # teacher 1 -> student 10, 3 -> 11
    d = gather_targets(cache, batch, 99, [-1], LogitPlan("shared-vocab", "", shared))
    np.testing.assert_array_equal(d["kl_pos"], [1, 2])  # unit 3 has none of teacher tokens 1, 3 in its top-k
    np.testing.assert_array_equal(d["kl_sids"], [[10, -1, 11], [-1, -1, 10]])
    assert abs(float(d["kl_coverage"]) - (0.7 + 0.1 + 0.0) / 3) < 1e-6


def test_distill_run_lowers_feature_loss_and_its_adapter_fuses(pico_dir, tmp_path):
    from helpers import make_teacher, write_describe_data

    from bonsai_mlx import loading
    from bonsai_mlx.convert.__main__ import main as convert
    from bonsai_mlx.train import main as train
    from train_cuda.extract import main as extract

    write_describe_data(tmp_path)
    teacher = make_teacher(tmp_path / "teacher")
    extract(
        [
            "--teacher",
            str(teacher),
            "--data",
            str(tmp_path / "d.json"),
            "--image-root",
            str(tmp_path / "img"),
            "--student-tokenizer",
            str(pico_dir),
            "--layers=-1,1",
            "--out",
            str(tmp_path / "cache"),
        ]
    )
    out = tmp_path / "run"
    assert (
        train(
            [
                "--model",
                str(pico_dir),
                "--data",
                str(tmp_path / "d.json"),
                "--image-root",
                str(tmp_path / "img"),
                "--stage",
                "distill",
                "--teacher-cache",
                str(tmp_path / "cache"),
                "--alpha",
                "1.0",
                "--layer-map",
                "-1:-1,1:1",
                "--max-steps",
                "12",
                "--batch-size",
                "4",
                "--lr",
                "1e-2",
                "--warmup",
                "1",
                "--log-every",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    feat = [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert np.mean(feat[-3:]) < 0.8 * np.mean(feat[:3]), feat
    assert convert(["fuse", str(pico_dir), str(out), str(tmp_path / "fused")]) == 0
    model, _ = loading.load(tmp_path / "fused")
    assert "extra" not in str(list(mx.load(str(tmp_path / "fused" / "model.safetensors")).keys()))
    assert np.isfinite(np.array(model(mx.array([[3, 4, 5]])))).all()


def _kl_cache(pico_dir, root, *, same_vocab: bool):
    """Describe-the-image data and a cache with the teacher's top-8 logits (its own vocabulary unless `same_vocab`)."""
    from helpers import make_teacher, write_describe_data

    from train_cuda.extract import main as extract

    write_describe_data(root)
    teacher = make_teacher(root / "teacher", tokenizer_from=pico_dir if same_vocab else None)
    args = ["--teacher", str(teacher), "--data", str(root / "d.json"), "--image-root", str(root / "img")]
    args += ["--student-tokenizer", str(pico_dir), "--layers=-1", "--out", str(root / "cache")]
    assert extract([*args, "--logits-topk", "8"]) == 0
    return root


@pytest.fixture(scope="module")
def cross_root(pico_dir, tmp_path_factory):
    return _kl_cache(pico_dir, tmp_path_factory.mktemp("cross"), same_vocab=False)


def _distill_args(pico_dir, root, out, *extra, lr="1e-2"):
    args = ["--model", str(pico_dir), "--data", str(root / "d.json"), "--image-root", str(root / "img")]
    args += ["--stage", "distill", "--teacher-cache", str(root / "cache"), "--out", str(out), *extra]
    return args + ["--batch-size", "4", "--lr", lr, "--warmup", "1", "--log-every", "1", "--lora-dropout", "0"]


def test_distill_with_kl_lowers_the_loss(pico_dir, tmp_path):
    from bonsai_mlx.train import main as train

    root = _kl_cache(pico_dir, tmp_path, same_vocab=True)
    out = tmp_path / "run"
    kl_args = ["--kl", "--kl-weight", "10", "--alpha", "0", "--max-steps", "40"]
    assert train(_distill_args(pico_dir, root, out, *kl_args, lr="3e-2")) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    # alpha 0: loss = CE + 10 KL, so the KL part is loss - ce and must be positive, then fall
    kl = [r["loss"] - r["ce"] for r in rows]
    assert min(kl[:3]) > 0 and np.mean(kl[-3:]) < 0.9 * np.mean(kl[:3]), kl
    assert all(abs(r["kl"] * 10 - (r["loss"] - r["ce"])) < 1e-3 * max(1, r["loss"]) for r in rows)


@pytest.mark.parametrize("mode", ["uld", "shared-vocab"])
def test_each_cross_tokenizer_mode_distils_from_a_teacher_with_another_vocabulary(
    pico_dir, cross_root, tmp_path, mode, capsys
):
    """The tiny LLaVA-shaped teacher (Unigram, '▁' pieces) and the Pico (byte-level BPE): the logit term is
    logged, finite, and falls."""
    from bonsai_mlx.train import main as train

    out = tmp_path / "run"
    kl_args = ["--kl-mode", mode, "--kl-weight", "10", "--alpha", "0", "--max-steps", "20"]
    assert train(_distill_args(pico_dir, cross_root, out, *kl_args, lr="3e-2")) == 0
    assert f"logit loss: {mode} (as asked)" in capsys.readouterr().out
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kl = [r["kl"] for r in rows]
    assert all(np.isfinite(kl)) and min(kl[:3]) > 0 and np.mean(kl[-3:]) < 0.8 * np.mean(kl[:3]), kl
    if mode == "shared-vocab":
        assert all(0 < r["kl_coverage"] <= 1 for r in rows)


def test_kl_across_vocabularies_picks_a_cross_tokenizer_mode_and_says_which(pico_dir, cross_root, tmp_path, capsys):
    from bonsai_mlx.train import main as train

    assert train(_distill_args(pico_dir, cross_root, tmp_path / "run", "--kl", "--max-steps", "2")) == 0
    said = [x for x in capsys.readouterr().out.splitlines() if "logit loss:" in x]
    assert len(said) == 1 and ("logit loss: uld (the vocabularies differ" in said[0] or "shared-vocab (" in said[0])
    assert "coverage" in said[0]  # the share of the teacher's mass the shared tokens keep, whichever was picked
    with pytest.raises(SystemExit):
        train(_distill_args(pico_dir, cross_root, tmp_path / "r2", "--kl-mode", "same-vocab", "--max-steps", "2"))
    err = capsys.readouterr().err
    assert "--kl-mode same-vocab" in err and "do not share a vocabulary" in err


def test_kl_without_logits_says_what_to_do_for_a_cache_and_for_the_online_teacher():
    from types import SimpleNamespace

    from bonsai_mlx.core.distill_targets import plan_logits
    from bonsai_mlx.core.errors import UserError

    with pytest.raises(UserError, match="re-extract it with --logits-topk K"):
        plan_logits(SimpleNamespace(logits_topk=0, root="runs/cache"), None)
    with pytest.raises(UserError, match="keeps no logits; add --logits-topk K$"):
        plan_logits(SimpleNamespace(logits_topk=0, root="online teacher llava-hf/llava-1.5-7b-hf"), None)
