"""The experiments' one step runner: a log per step, each step once, the JSON its command ends with, and a
failure that names the step and its log (in a child of its own and in the shared worker alike)."""

import json

import pytest

from experiments.steps import StepFailed, Steps


@pytest.mark.parametrize("worker", [False, True])
def test_a_command_step_logs_returns_its_json_and_runs_once(tmp_path, capsys, worker):
    (tmp_path / "a.json").write_text('{"b": [1, 2]}')
    with Steps(tmp_path / "run", "t", worker=worker) as steps:
        got = steps.run("compact", "json.tool", "--compact", str(tmp_path / "a.json"))
        assert got["b"] == [1, 2] and got["seconds"] >= 0 and steps.ran == ["compact"]
        log = (tmp_path / "run" / "logs" / "compact.log").read_text()
        assert log.endswith('{"b":[1,2]}\n') and "$ python -m json.tool --compact" in log
    assert json.loads((tmp_path / "run" / "steps.json").read_text())["compact"]["b"] == [1, 2]

    again = Steps(tmp_path / "run", "t", worker=worker)
    capsys.readouterr()
    assert again.run("compact", "json.tool", str(tmp_path / "missing.json"))["b"] == [1, 2]
    assert again.ran == [] and "compact: done already" in capsys.readouterr().out


@pytest.mark.parametrize("worker", [False, True])
def test_a_failing_command_names_the_step_and_its_log(tmp_path, worker):
    with Steps(tmp_path, "t", noun="stage", worker=worker) as steps, pytest.raises(StepFailed) as e:
        steps.run("read", "json.tool", str(tmp_path / "missing.json"))
    log = tmp_path / "logs" / "read.log"
    assert str(e.value).startswith("stage read failed: python -m json.tool exited 2: ")
    assert "missing.json" in str(e.value) and str(e.value).endswith(f"(log: {log})") and e.value.code == 2
    assert not (tmp_path / "steps.json").exists()  # not recorded: a rerun tries it again


def test_a_step_whose_output_exists_is_skipped_and_an_interrupted_one_cleared(tmp_path):
    steps = Steps(tmp_path, "t")
    (tmp_path / "made").write_text("by an earlier driver")
    assert steps.step("old", lambda log: pytest.fail("ran"), done=tmp_path / "made") == {}
    half = tmp_path / "half"
    half.mkdir()
    (half / "part").write_text("left by a killed try")
    assert steps.step("new", lambda log: {"there": half.exists()}, clear=[half])["there"] is False
    with pytest.raises(StepFailed, match=r"^step boom failed: ZeroDivisionError: division by zero \(log: "):
        steps.step("boom", lambda log: 1 / 0)
    assert "ZeroDivisionError" in (tmp_path / "logs" / "boom.log").read_text()  # the traceback, in the log
