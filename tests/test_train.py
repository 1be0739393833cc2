import json

import mlx.core as mx
import numpy as np
import pytest
from helpers import image
from mlx.utils import tree_flatten

from bonsai_mlx import loading, lora
from bonsai_mlx.core.batching import collate
from bonsai_mlx.core.processing import Processor
from bonsai_mlx.core.records import IGNORE, Dataset, read_records, tokenize
from bonsai_mlx.core.train_config import TrainConfig
from bonsai_mlx.loss import ce_at, forward_states, to_mx
from bonsai_mlx.trainer import Trainer, setup_trainable

QA = [
    ("What colour is the square?", "red"),
    ("Where is the circle?", "top left"),
    ("How many shapes are there?", "two"),
]


@pytest.fixture
def data(tmp_path):
    """Six LLaVA records with real PNGs (one multi-turn, one text-only)."""
    (tmp_path / "img").mkdir()
    recs = []
    for i in range(6):
        image(i).save(tmp_path / "img" / f"{i}.png")
        q, a = QA[i % 3]
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
        if i == 0:
            conv += [{"from": "human", "value": "Are you sure?"}, {"from": "gpt", "value": "yes"}]
        recs.append({"id": f"s{i}", "image": f"{i}.png", "conversations": conv})
    recs.append(
        {"id": "text", "conversations": [{"from": "human", "value": "Say no."}, {"from": "gpt", "value": "no"}]}
    )
    p = tmp_path / "train.json"
    p.write_text(json.dumps(recs))
    return p, tmp_path / "img"


def _load(pico_dir):
    model, cfg = loading.load(pico_dir)
    return model, Processor(pico_dir, cfg)


def test_only_assistant_tokens_carry_loss(pico_dir):
    _, proc = _load(pico_dir)
    msgs = [
        {"role": "user", "content": "<image>\nWhat colour is the square?"},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "yes it is"},
    ]
    ids, labels, _ = tokenize(proc, msgs)
    assert ids == proc.encode(msgs, add_generation_prompt=False)  # same tokens as rendering the whole chat
    supervised = [t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE]
    im_end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert supervised == proc.encode_text("red") + [im_end] + proc.encode_text("yes it is") + [im_end]
    assert all(lab == IGNORE for t, lab in zip(ids, labels, strict=True) if t == proc.image_token_id)


def test_fresh_lora_leaves_logits_unchanged_and_only_trainables_move(pico_dir, data):
    model, proc = _load(pico_dir)
    ids = mx.array([[3, 4, 5, 6]])
    before = np.array(model(ids))
    cfg = TrainConfig(
        stage="instruct",
        lora_rank=4,
        lora_dropout=0.0,
        batch_size=2,
        max_steps=2,
        lr=1e-2,
        out=str(data[1].parent / "run"),
    )
    setup_trainable(model, cfg)
    np.testing.assert_array_equal(np.array(model(ids)), before)
    frozen = {k: np.array(v) for k, v in tree_flatten(model.parameters()) if "lora" not in k and "projector" not in k}
    ds = Dataset.build(read_records(data[0]), proc, data[1])
    tr = Trainer(cfg, model, proc, ds)
    tr.train_step([collate(ds.examples[:2], proc, 0)])
    after = dict(tree_flatten(model.parameters()))
    assert all(np.array_equal(np.array(after[k]), v) for k, v in frozen.items())
    assert not np.array_equal(np.array(model(ids)), before)


def test_one_step_matches_transformers_peft(pico_dir, data, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    model, proc = _load(pico_dir)
    cfg = TrainConfig(stage="instruct", lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    setup_trainable(model, cfg)
    mx.random.seed(1)
    for _, m in model.named_modules():  # non-zero B so every LoRA gradient is non-trivial
        if isinstance(m, lora.LoRALinear):
            m.lora_b = mx.random.normal(m.lora_b.shape) * 0.1
    lora.save_adapter(model, tmp_path / "ad", 4, 8, 0.0, lora.TARGETS)
    ds = Dataset.build(read_records(data[0]), proc, data[1])
    b = collate(ds.examples[:3], proc, 0)

    def loss_fn(m, batch):
        h, _ = forward_states(m, batch, False, False)
        return ce_at(m, h, batch["positions"], batch["targets"]) / batch["targets"].shape[0]

    import mlx.nn as nn

    loss, grads = nn.value_and_grad(model, loss_fn)(model, to_mx(b))
    grads = dict(tree_flatten(grads))

    ref = LlavaForConditionalGeneration.from_pretrained(str(pico_dir), dtype=torch.float32)
    ref = PeftModel.from_pretrained(ref, str(tmp_path / "ad"), is_trainable=True)
    labels = np.full(b.input_ids.shape, IGNORE)
    for i, e in enumerate(ds.examples[:3]):
        labels[i, : len(e.labels)] = e.labels
    out = ref(
        input_ids=torch.tensor(b.input_ids, dtype=torch.long),
        pixel_values=torch.tensor(b.pixel_values),
        labels=torch.tensor(labels, dtype=torch.long),
    )
    out.loss.backward()
    assert abs(out.loss.item() - loss.item()) < 1e-5
    named = dict(ref.named_parameters())
    for layer, proj in ((0, "self_attn.q_proj"), (2, "mlp.down_proj")):
        ours = np.array(grads[f"language_model.model.layers.{layer}.{proj}.lora_a"]).T
        theirs = named[
            f"base_model.model.model.language_model.layers.{layer}.{proj}.lora_A.default.weight"
        ].grad.numpy()
        np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=1e-3)
    # and the adapter, applied by peft, gives the MLX logits
    with torch.no_grad():
        ref_logits = (
            ref(
                input_ids=torch.tensor(b.input_ids[:1], dtype=torch.long), pixel_values=torch.tensor(b.pixel_values[:1])
            )
            .logits[0]
            .numpy()
        )
    ours = np.array(model(mx.array(b.input_ids[:1]), mx.array(b.pixel_values[:1]))[0])
    assert np.abs(ours - ref_logits).max() < 1e-4


def _train(pico_dir, data, out, steps, resume=None, **kw):
    model, proc = _load(pico_dir)
    cfg = TrainConfig(
        model=str(pico_dir),
        stage="instruct",
        lora_rank=4,
        lora_dropout=0.1,
        batch_size=2,
        max_steps=6,
        lr=5e-3,
        warmup=2,
        log_every=1,
        out=str(out),
        save_every=3,
        **kw,
    )
    mx.random.seed(cfg.seed)  # as the CLI does: LoRA init is seeded
    setup_trainable(model, cfg)
    ds = Dataset.build(read_records(data[0]), proc, data[1])
    tr = Trainer(cfg, model, proc, ds)
    if resume:
        tr.load_checkpoint(resume)
    tr.total_steps = 6
    while tr.step < steps:
        tr.train_step([next(tr.micro_batches(tr.step))])
        if tr.step == 3:
            tr.save_checkpoint()
    return tr, {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_resume_is_exact(pico_dir, data, tmp_path):
    _, straight = _train(pico_dir, data, tmp_path / "a", 6)
    _train(pico_dir, data, tmp_path / "b", 3)
    tr, resumed = _train(pico_dir, data, tmp_path / "b", 6, resume=tmp_path / "b")
    assert tr.step == 6 and straight.keys() == resumed.keys()
    for k in straight:
        np.testing.assert_array_equal(straight[k], resumed[k], err_msg=k)


def test_run_writes_peft_adapter_checkpoints_and_metrics(pico_dir, data, tmp_path):
    out = tmp_path / "run"
    rows = _cli(
        pico_dir, data, out, "--stage", "instruct", "--max-steps", "4", "--batch-size", "2", "--save-every", "2"
    )
    final = out / "checkpoints" / "final"
    assert json.loads((final / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (final / "projector.safetensors").is_file() and (out / "checkpoints" / "step-0000002").is_dir()
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)


def test_bad_records_are_skipped_and_counted(pico_dir, data, tmp_path):
    _, proc = _load(pico_dir)
    recs = read_records(data[0])
    (data[1] / "broken.png").write_bytes(b"\x89PNG not really")
    recs += [
        {"id": "noimg", "image": "missing.png", "conversations": recs[1]["conversations"]},
        {"id": "noturns", "conversations": []},
        {"id": "nogpt", "conversations": [{"from": "human", "value": "hi"}]},
        {"id": "corrupt", "image": "broken.png", "conversations": recs[1]["conversations"]},
    ]
    ds = Dataset.build(recs, proc, data[1])
    assert set(ds.bad) == {"noimg", "noturns", "nogpt"} and "missing.png" in ds.bad["noimg"]
    assert "3 skipped" in ds.summary()
    b = collate([e for e in ds.examples if e.id in ("corrupt", "s1")], proc, 0)
    assert b.ids == ["s1"] and "corrupt" in b.skipped
    with pytest.raises(ValueError, match="record noimg"):
        Dataset.build(recs, proc, data[1], on_bad="error")


def _cli(pico_dir, data, out, *extra):
    """Run the training CLI on the fixture data; return its metrics rows."""
    from bonsai_mlx.train import main

    base = ["--model", str(pico_dir), "--data", str(data[0]), "--image-root", str(data[1])]
    assert main([*base, "--log-every", "1", "--out", str(out), *extra]) == 0
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_float16_training_stays_finite(pico_dir, data, tmp_path):
    rows = _cli(
        pico_dir, data, tmp_path / "fp16", "--dtype", "float16", "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2"
    )
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)


def test_qlora_trains_over_a_4bit_base(pico_dir, data, tmp_path):
    rows = _cli(
        pico_dir, data, tmp_path / "q", "--quantize-base", "4", "--max-steps", "4", "--batch-size", "3", "--lr", "1e-2"
    )
    assert len(rows) == 4 and all(np.isfinite(r["loss"]) for r in rows)


def test_embedded_default_quick_run_learns(tmp_path, capsys):
    from bonsai_mlx.train import main

    out = tmp_path / "shapes"
    assert main(["--quick", "--out", str(out)]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    first, last = np.mean([r["loss"] for r in rows[:5]]), np.mean([r["loss"] for r in rows[-10:]])
    assert len(rows) == 50 and last < 0.5 * first, (first, last)
    text = capsys.readouterr().out
    assert "held-out exact match" in text and "python -m bonsai_mlx.generate --model" in text
    assert (out / "model" / "config.json").is_file()


def test_data_parallel_under_mlx_launch(pico_dir, data, tmp_path):
    """Two processes on CPU; some micro-batches are all corrupt images, and at some step only one process has
    one: that process must still join the gradient all_sum (it used to return early and hang the other)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from bonsai_mlx.core.batching import BatchSchedule

    recs = read_records(data[0])
    (data[1] / "broken.png").write_bytes(b"\x89PNG not really")
    recs += [{**r, "id": f"bad{i}", "image": "broken.png"} for i, r in enumerate(recs[1:6])]
    (tmp_path / "dp.json").write_text(json.dumps(recs))
    _, proc = _load(pico_dir)
    ds = Dataset.build(recs, proc, data[1])
    lengths = [len(e.ids) for e in ds.examples]
    bad = [
        [ds.examples[j].id.startswith("bad") for j in BatchSchedule(lengths, 1, 0, True, r, 2)[k]]
        for r in (0, 1)
        for k in range(3)
    ]
    per_step = [(bad[k][0], bad[3 + k][0]) for k in range(3)]
    assert any(a != b for a, b in per_step), per_step  # the case this test is about does occur
    launcher = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
    out = tmp_path / "dp"
    r = subprocess.run(
        [
            launcher,
            "-n",
            "2",
            "--backend",
            "ring",
            sys.executable,
            "-m",
            "bonsai_mlx.train",
            "--model",
            str(pico_dir),
            "--data",
            str(tmp_path / "dp.json"),
            "--image-root",
            str(data[1]),
            "--max-steps",
            "3",
            "--batch-size",
            "1",
            "--log-every",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        start_new_session=True,  # (a hang is killed with its process group)
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "data-parallel over 2 processes" in r.stdout
    assert "skipped" in r.stdout  # the corrupt images were counted, not fatal
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 3  # only rank 0 writes
    assert (out / "checkpoints" / "final" / "adapter_model.safetensors").is_file()


def test_batch_schedule_is_deterministic_sharded_and_honours_grouping():
    from bonsai_mlx.core.batching import BatchSchedule

    lengths = [10 + (i % 5) * 20 for i in range(200)]  # five "kinds", each with its own length
    grouped = BatchSchedule(lengths, 8, seed=1, group=True)
    free = BatchSchedule(lengths, 8, seed=1, group=False)
    kinds = lambda batch: len({lengths[j] for j in batch})  # noqa: E731
    assert max(kinds(grouped[k]) for k in range(grouped.per_epoch)) <= 2  # grouped: near-uniform lengths
    assert sum(kinds(free[k]) for k in range(free.per_epoch)) / free.per_epoch > 3  # shuffled: mixed
    again = BatchSchedule(lengths, 8, seed=1, group=False)
    assert [again[k] for k in (30, 3, 27)] == [free[k] for k in (30, 3, 27)]  # any order, same answer
    r0, r1 = BatchSchedule(lengths, 8, 1, False, 0, 2), BatchSchedule(lengths, 8, 1, False, 1, 2)
    seen0 = {j for k in range(r0.per_epoch) for j in r0[k]}
    seen1 = {j for k in range(r1.per_epoch) for j in r1[k]}
    assert not seen0 & seen1 and r0.per_epoch == 12
