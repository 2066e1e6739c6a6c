"""Whole-job signals: SIGTERM to every process of the job (trainer and judge client processes, as SLURM's
preemption and scancel send it) still ends in a checkpoint at the step boundary and exit 0; a STOP file written
after the process started is honoured, one older than the process is deleted."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT
from openai_stub_server import OpenAIStubServer, StubReply


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (judge clients start their own session, so a process group would miss them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def test_sigterm_to_the_whole_job_with_judge_clients_checkpoints_and_exits_0(tiny_model_dir, tmp_path):
    out = tmp_path / "rim"
    recipe = tmp_path / "rim.yaml"
    recipe.write_text("defaults:\n  - model: tiny\n  - data: arithmetic_rl\n  - trainer: grpo\n"
                      "  - reward: interpretation_teaching\nreward_funcs: [rim]\nuse_vllm: false\n")
    verdict = json.dumps({"principles": [], "score": 0.5, "rationale": "ok", "uncertainty": 0.1})
    with OpenAIStubServer(reply=lambda request: StubReply(content=verdict)) as server:
        overrides = [f"models.api_base={server.base_url}", "models.small_model=openai/small",
                     "models.large_model=openai/large", "temperatures=[0.2]", "parallel_execution.client_processes=2"]
        args = ["train_grpo.py", "--config", str(recipe), f"model_name_or_path={tiny_model_dir}", f"output_dir={out}",
                "teacher_reward.overrides=" + json.dumps(overrides), "teacher_reward.completion_as=answer",
                "make_dataset_fn.num_samples=64", "train_batch_size=8", "per_device_train_batch_size=8",
                "num_generations=4", "max_steps=100000", "max_completion_length=4", "beta=0", "do_eval=false",
                "save_steps=0", "logging_steps=1", "bf16=false", "gradient_checkpointing=false"]
        trainer = subprocess.Popen([sys.executable, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                                   start_new_session=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            for line in trainer.stderr:
                if line.startswith("step 2/"):
                    break
            job = [trainer.pid, *descendants(trainer.pid)]
            assert len(job) >= 3, job  # the trainer and its two judge client processes
            for pid in job:  # what SLURM does: every process of the job, not one process group
                os.kill(pid, signal.SIGTERM)
            _, rest = trainer.communicate(timeout=300)
        finally:
            if trainer.poll() is None:
                trainer.kill()
    assert trainer.returncode == 0, rest[-4000:]
    assert "exited with code" not in rest
    checkpoints = list(out.glob("checkpoint-*"))
    assert len(checkpoints) == 1 and (checkpoints[0] / "trainer_state.json").is_file()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() for pid in job[1:]):
        time.sleep(0.2)  # the clients exit once the trainer's sockets close
    assert not [pid for pid in job[1:] if Path(f"/proc/{pid}/stat").exists()
                and Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]


def test_a_stop_file_older_than_the_process_is_deleted_and_a_newer_one_kept(tmp_path):
    from common.checkpoint import PreemptionFlag, process_start_time
    stop = tmp_path / "STOP"
    stop.touch()
    old = process_start_time() - 60
    os.utime(stop, (old, old))
    PreemptionFlag(str(tmp_path), is_main=True, signals=())
    assert not stop.exists()
    stop.touch()  # written after this process started, e.g. while the models were loading
    flag = PreemptionFlag(str(tmp_path), is_main=True, signals=())
    assert stop.exists() and flag.stop_file.exists()
