"""One run per output directory: a reused directory is refused unless overwrite_output_dir, a resume must match
the checkpoint's run, two runs at once cannot share a directory, and a resume drops the killed run's extra rows."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, run_python


def sft(model: Path, out: Path, *extra: str) -> list[str]:
    return ["train_sft.py", "--config", "configs/recipe/quickstart_sft.yaml", f"model_name_or_path={model}",
            f"output_dir={out}", "make_dataset_fn.num_samples=100", "train_batch_size=8",
            "per_device_train_batch_size=8", "eval_generation_reward=null", "do_eval=false", "logging_steps=1",
            "save_steps=3", "save_total_limit=5", *extra]


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): p.stat().st_mtime_ns for p in directory.rglob("*")}


def steps(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "first"
    result = run_python(sft(tiny_model_dir, out, "max_steps=5"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(out) == [1, 2, 3, 4, 5] and (out / "checkpoint-3").is_dir()
    return out


@pytest.fixture
def copy_of(finished_run, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(finished_run, out)
    return out


@pytest.mark.parametrize("overrides,message", [
    ([], "already holds a run (checkpoint-3, metrics.jsonl); resume it with resume_from_checkpoint=latest"),
    (["resume_from_checkpoint=latest", "max_seq_length=100"],
     "was trained with other settings (max_seq_length: 64 there, 100 now)"),
    (["resume_from_checkpoint=latest", "train_batch_size=4", "per_device_train_batch_size=4"],
     "(train_batch_size: 8 there, 4 now)"),
    (["resume_from_checkpoint=latest", "seed=1"], "(seed: 42 there, 1 now)"),
    (["resume_from_checkpoint=latest", "max_steps=3"], "is at step 3, and max_steps = 3 leaves nothing to train"),
], ids=["fresh-run-in-used-dir", "max_seq_length", "batch", "seed", "nothing-to-train"])
def test_a_reused_directory_or_a_mismatched_resume_is_refused_untouched(tiny_model_dir, copy_of, overrides, message,
                                                                       capsys):
    """In-process (the refusal comes before any model loads); the real process's exit is checked below."""
    from train_sft import main
    shutil.rmtree(copy_of / "checkpoint-5", ignore_errors=True)  # "latest" is checkpoint-3 (the kill after step 5)
    before = snapshot(copy_of)
    with pytest.raises(SystemExit) as exit_info:
        main(sft(tiny_model_dir, copy_of, "max_steps=5", *overrides)[1:])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last, last
    assert snapshot(copy_of) == before


def test_resume_drops_the_killed_runs_rows_and_overwrite_replaces_the_run(tiny_model_dir, copy_of):
    shutil.rmtree(copy_of / "checkpoint-5", ignore_errors=True)
    result = run_python(sft(tiny_model_dir, copy_of, "max_steps=5", "resume_from_checkpoint=latest"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(copy_of) == [1, 2, 3, 4, 5]  # rows 4 and 5 of the killed run were dropped, not duplicated

    result = run_python(sft(tiny_model_dir, copy_of, "max_steps=2", "overwrite_output_dir=true", "save_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert steps(copy_of) == [1, 2]
    assert sorted(p.name for p in copy_of.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


def test_two_runs_cannot_share_a_directory(tiny_model_dir, tmp_path):
    out = tmp_path / "shared"
    first = subprocess.Popen([sys.executable, *sft(tiny_model_dir, out, "max_steps=100000", "save_steps=0")],
                             cwd=ROOT, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        for line in first.stderr:
            if line.startswith("step 2/"):
                break
        before = snapshot(out)
        second = run_python(sft(tiny_model_dir, out, "max_steps=3", "resume_from_checkpoint=latest"))
        assert second.returncode == 2
        assert f"error: output_dir {out} is in use by another run (process {first.pid} holds" in second.stderr
        assert {k: v for k, v in snapshot(out).items() if k != "metrics.jsonl"} == \
            {k: v for k, v in before.items() if k != "metrics.jsonl"}
        (out / "STOP").touch()
        _, rest = first.communicate(timeout=300)
        assert first.returncode == 0, rest[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    rows = steps(out)
    assert rows == list(range(1, len(rows) + 1))  # one run's rows, none torn or repeated


def test_the_before_after_table_keeps_the_true_start_across_a_resume(tmp_path):
    from common.evaluation import format_accuracy_table, start_rows
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 0, "eval/reward": 0.894, "eval/num_samples": 500}\n{"step": 1, "loss": 0.1}\n')
    resumed = {"accuracy": 0.924, "num_scored": 500}
    table = format_accuracy_table(start_rows(str(tmp_path), "sft-model", 40, resumed))
    assert "| start (sft-model; from metrics.jsonl) | 89.4 % | 500 |" in table
    assert "| resumed checkpoint (step 40) | 92.4 % | 500 |" in table
    assert start_rows(str(tmp_path), "sft-model", 0, resumed) == [("start (sft-model)", resumed)]
