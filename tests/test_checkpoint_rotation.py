"""A run killed (SIGKILL) while checkpoint rotation deletes an old checkpoint: the newest complete checkpoint
survives, nothing half deleted looks like a checkpoint, and `resume_from_checkpoint=latest` continues from it."""
from __future__ import annotations

import json
import textwrap

import pytest

from common.checkpoint import list_checkpoints, resolve_resume_path
from conftest import run_python
from test_train_sft import sft_args

# train_sft.py whose rmtree, once it deletes a checkpoint (not a .tmp save), removes the weights and then the process
# is killed: a kill -9 in the middle of rotation, made deterministic
DYING_DELETE = textwrap.dedent('''
    import os, shutil, signal, sys
    from pathlib import Path

    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        path = Path(path)
        if path.name.startswith("checkpoint-") and not path.name.endswith(".tmp") and (path / "model.safetensors").exists():
            (path / "model.safetensors").unlink()
            print(f"killed while deleting {path.name}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree
    sys.argv = ["train_sft.py", *sys.argv[1:]]
    import train_sft
    train_sft.main()
''')


def metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_during_rotation_keeps_the_newest_checkpoint_and_resumes_from_it(tiny_model_dir, tmp_path):
    common = ["max_steps=6", "train_batch_size=8", "per_device_train_batch_size=8", "save_steps=2",
              "save_total_limit=1"]
    wrapper = tmp_path / "dying_delete.py"
    wrapper.write_text(DYING_DELETE)
    out = tmp_path / "run"
    args = sft_args(tiny_model_dir, out, *common)
    killed = run_python([str(wrapper), *args[1:]])
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert "killed while deleting checkpoint-2" in killed.stderr
    # every directory that still looks like a checkpoint is complete; the newest one is the step-4 save
    found = list_checkpoints(out)
    assert [p.name for p in found] == ["checkpoint-4"], sorted(p.name for p in out.iterdir())
    assert (found[0] / "model.safetensors").is_file() and (found[0] / "training_state").is_dir()
    assert resolve_resume_path("latest", str(out)) == out / "checkpoint-4"

    resumed = run_python(args + ["resume_from_checkpoint=latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in resumed.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-6"]
    assert not list(out.glob("checkpoint-*.deleting")) and not list(out.glob("*.tmp"))

    straight = tmp_path / "straight"
    assert run_python(sft_args(tiny_model_dir, straight, *common)).returncode == 0
    reference = {r["step"]: r["loss"] for r in metrics(straight) if "loss" in r}
    rows = [r for r in metrics(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5)
