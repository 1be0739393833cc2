"""The two-stage recipe in miniature end to end, at smoke size (its numbers mean nothing here): every stage's
output is there and loads strictly, the table has every stage, a rerun skips finished stages, a stage cut
short runs again, and a failing stage says which one and where its log is."""

import json

import pytest

from experiments.recipe import ARMS, Setup, main, rows_of
from experiments.worker import run_one

pytestmark = pytest.mark.filterwarnings("ignore")


def _strict(cls, path):
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], (path, info)
    return model


def _param(model, suffix, within=""):
    """The one parameter named `...within...suffix` (module paths differ across transformers versions)."""
    (p,) = [p for n, p in model.named_parameters() if n.endswith(suffix) and within in n]
    return p


def test_recipe_quick_end_to_end_resumes_and_names_a_failing_stage(tmp_path, capsys):
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, Qwen2ForCausalLM, SiglipModel

    out = tmp_path / "recipe" / "seed-0"  # where --seeds 0,... finds it below
    assert main(["--quick", "--out", str(out)]) == 0
    ROWS = rows_of(Setup())
    res = json.loads((out / "results.json").read_text())
    assert [r["eval"] for r in res["rows"]] == [name for name, *_ in ROWS]
    assert sorted(res["rows"][0]["by_type"]) == ["colour", "count", "position", "shape", "yesno"]
    assert all(r["caption_ppl"] > 1.0 for r in res["rows"])  # perplexity of the reference captions, each stage
    md = (out / "results.md").read_text()
    assert all(label in md for _, label, *_ in ROWS)

    # (a), (b): standard HF checkpoints with their tokenizer / image processor, loaded strictly
    lm = _strict(Qwen2ForCausalLM, out / "lm")
    assert len(AutoTokenizer.from_pretrained(str(out / "lm"))) == lm.config.vocab_size
    siglip = _strict(SiglipModel, out / "siglip")
    assert (out / "siglip" / "preprocessor_config.json").is_file()
    # (c) carries the pretrained parts as they are; (d) trained the projector only; (e)+(f) fused the adapter
    assembled = _strict(LlavaForConditionalGeneration, out / "pico-assembled")
    aligned = _strict(LlavaForConditionalGeneration, out / "pico-aligned")
    instructed = _strict(LlavaForConditionalGeneration, out / "pico-instruct")
    emb = assembled.get_input_embeddings().weight
    assert torch.equal(emb, lm.get_input_embeddings().weight)
    patch = _param(assembled, "embeddings.patch_embedding.weight")
    assert torch.equal(patch, _param(siglip.vision_model, "embeddings.patch_embedding.weight"))
    up = "layers.0.mlp.up_proj.weight"
    assert torch.equal(_param(aligned, up), _param(assembled, up))  # the LM stayed frozen in (d)
    assert torch.equal(_param(aligned, "embeddings.patch_embedding.weight"), patch)
    assert not torch.equal(*(_param(m, "multi_modal_projector.linear_1.weight") for m in (assembled, aligned)))
    q0, q1 = (_param(m, "layers.0.self_attn.q_proj.weight", "language_model") for m in (aligned, instructed))
    assert not torch.equal(q0, q1)  # the LoRA update merged in
    cfg4 = json.loads((out / "pico-4bit" / "config.json").read_text())
    assert cfg4["quantization"]["bits"] == 4
    from bonsai_mlx import loading

    loading.load(out / "pico-4bit")  # strict: every tensor the 4-bit config needs, none other
    _strict(LlavaForConditionalGeneration, out / "scratch-full" / "model")

    # a rerun skips every finished stage
    logs = {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()}
    capsys.readouterr()
    assert main(["--quick", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "running" not in said and said.count("skipped") == len(json.loads((out / "stages.json").read_text()))
    assert {p.name: p.stat().st_mtime_ns for p in (out / "logs").iterdir()} == logs

    # other settings do not reuse these stages
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(out), "--lm-steps", "5"])
    assert e.value.code == 2 and "made with --lm-steps 3, not 5" in capsys.readouterr().err

    # more (e) arms beside the finished stages, and a second seed: every seed's rows, their mean
    arms = ",".join(ARMS)
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(out.parent), "--seeds", "0,1", "--arms", "instruct,nope"])
    assert e.value.code == 2 and "--arms: unknown arm 'nope'" in capsys.readouterr().err
    assert main(["--quick", "--out", str(out.parent), "--seeds", "0,1", "--arms", arms]) == 0
    said = capsys.readouterr().out
    assert "lm: done already" in said and "instruct: done already" in said and "instruct-mix: running" in said
    lora_only = _strict(LlavaForConditionalGeneration, out / "pico-instruct-lora-only")
    proj_only = _strict(LlavaForConditionalGeneration, out / "pico-instruct-projector-only")
    p1 = "multi_modal_projector.linear_1.weight"
    assert torch.equal(_param(lora_only, p1), _param(aligned, p1))  # frozen projector, trained adapters
    assert not torch.equal(_param(lora_only, "layers.0.self_attn.q_proj.weight", "language_model"), q0)
    assert not torch.equal(_param(proj_only, p1), _param(aligned, p1))  # the other way round
    assert torch.equal(_param(proj_only, "layers.0.self_attn.q_proj.weight", "language_model"), q0)
    assert (out / "instruct-mix" / "train.yaml").read_text().count("all.json") == 1  # captions + questions
    agg = json.loads((out.parent / "results.json").read_text())
    per = [json.loads((out.parent / f"seed-{k}" / "results.json").read_text()) for k in (0, 1)]
    assert agg["seeds"] == [0, 1] and [r["eval"] for r in agg["rows"]] == [r["eval"] for r in per[1]["rows"]]
    assert [r["eval"] for r in agg["rows"]][2:5] == ["instruct", "4bit", "instruct-mix"]
    assert len(agg["rows"]) == 2 + len(ARMS) + 1 + 1  # (c), (d), the arms, 4-bit, the baseline
    mix20 = json.loads((out / "data" / "mix-20.json").read_text())
    assert sum(r["type"] == "caption" for r in mix20) / len(mix20) == pytest.approx(0.2, abs=0.02)
    yaml1x = (out / "instruct-mix-projector-1x" / "train.yaml").read_text()
    assert "projector_lr: 0.0005" in yaml1x and "lr: 0.0005" in yaml1x
    for i, row in enumerate(agg["rows"]):
        assert row["questions"]["values"] == [p["rows"][i]["questions"] for p in per]
        assert row["questions"]["mean"] == pytest.approx(sum(row["questions"]["values"]) / 2)
    aligned_row = next(r for r in agg["rows"] if r["eval"] == "aligned")
    assert aligned_row["ppl_vs_aligned"]["values"] == [1.0, 1.0]
    assert "2 seeds (0, 1)" in (out.parent / "results.md").read_text()

    # a stage that did not finish (not in stages.json) runs again, alone
    state = json.loads((out / "stages.json").read_text())
    assert all(state[k]["cpu_seconds"] > 0 for k in ("align", "eval-4bit"))  # the MLX worker's CPU is counted
    del state["siglip"]
    (out / "stages.json").write_text(json.dumps(state))
    assert main(["--quick", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.count("running") == 1 and "siglip: running" in said

    # a failing stage: one line naming it and its log
    state = json.loads((out / "stages.json").read_text())
    del state["instruct"]
    (out / "stages.json").write_text(json.dumps(state))
    (out / "pico-aligned" / "model.safetensors").unlink()
    with pytest.raises(SystemExit) as e:
        main(["--quick", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("recipe: stage instruct failed: python -m bonsai_mlx.train exited 2")
    assert err[0].endswith(f"(log: {out / 'logs' / 'instruct.log'})")


def test_cli_worker_runs_commands_as_python_m_with_their_output_and_exit_status(tmp_path):
    """The recipe's MLX steps share one process: each still gets its argv, its log and its own exit status."""
    (tmp_path / "a.json").write_text('{"b": [1, 2]}')
    log = tmp_path / "log"
    assert run_one("json.tool", ["--compact", str(tmp_path / "a.json")], str(log)) == 0
    assert log.read_text() == '{"b":[1,2]}\n'
    assert run_one("json.tool", [str(tmp_path / "missing.json")], str(log)) != 0
    assert "missing.json" in log.read_text().splitlines()[-1]
    assert run_one("no_such_module_here", [], str(log)) == 1
    assert "No module named no_such_module_here" in log.read_text()
