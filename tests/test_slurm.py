"""slurm/train.sbatch under a real one-node SLURM cluster (munged + slurmctld + slurmd started by the fixture).

Five jobs run side by side; the first three are real 2-process CPU (gloo) SFT runs of the tiny model:
  reference  uninterrupted: finishes its steps and is not requeued
  usr1       the time-limit warning: `scancel --signal=USR1 --batch` (the batch shell only)
  term       a cluster-style preemption: `scancel --signal=TERM --full` (every process of the job)
  crash      a run that fails before any checkpoint: not requeued
  bad_config a config error: the job fails before launching anything
The preempted jobs must checkpoint at a step boundary, requeue themselves, resume there, and log the same loss
trajectory as the reference, step for step.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import ROOT
from slurm_cluster import SlurmCluster, missing_commands

pytestmark = [
    pytest.mark.skipif(bool(missing_commands()), reason=f"SLURM not installed (missing: {', '.join(missing_commands())}); "
                                                        f"`apt-get install -y slurm-wlm munge` (.ci/run does)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="the test cluster's slurmd runs as root"),
]

MAX_STEPS = 40
SIGNAL_AFTER_STEP = 3
SIGNALS = {"usr1": ["--signal=USR1", "--batch"], "term": ["--signal=TERM", "--full"]}


def sft_args(model_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train_sft.py", "configs/recipe/quickstart_sft.yaml", f"model_name_or_path={model_dir}",
            f"output_dir={output_dir}", "make_dataset_fn.num_samples=400", "make_dataset_fn.band_dropped_carry_rate=0",
            "eval_generation_reward=null", "logging_steps=1", "do_eval=false", "save_steps=0",
            f"max_steps={MAX_STEPS}", "train_batch_size=8", "per_device_train_batch_size=4", *extra]


def metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sbatch_lines(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if line.startswith("[train.sbatch]")]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def jobs(cluster, tiny_model_dir, tmp_path_factory):
    """Submit the five jobs, signal and release them as they go, and return what was seen."""
    work = tmp_path_factory.mktemp("jobs")
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "VENV": "",
           "ACCELERATE_USE_CPU": "true", "ACCELERATE_CONFIG": "accelerate_configs/cpu_2proc.yaml",
           "PROCS_PER_NODE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    seen = {}
    for name in ("reference", "usr1", "term", "crash", "bad_config"):
        out = work / name
        extra = {"crash": ["model_name_or_path=" + str(work / "no-such-model")],
                 "bad_config": ["learning_rat=1e-3"]}.get(name, [])
        log = work / f"{name}.log"
        job_env = {**env, "PROCS_PER_NODE": "1"} if name in ("crash", "bad_config") else env
        job_id = cluster.submit(f"--job-name={name}", f"--output={log}", "--cpus-per-task=1",
                                "slurm/train.sbatch", *sft_args(tiny_model_dir, out, *extra), cwd=ROOT, env=job_env)
        seen[name] = {"id": job_id, "out": out, "log": log, "signaled": False, "released": False}

    deadline = time.time() + 900
    while True:
        states = {}
        for name, job in seen.items():
            info = cluster.job(job["id"])
            states[name] = info.get("JobState", "?")
            if name in SIGNALS and not job["signaled"] and any(
                    r.get("step", 0) >= SIGNAL_AFTER_STEP for r in metrics(job["out"])):
                cluster.cmd("scancel", *SIGNALS[name], str(job["id"]))
                job["signaled"] = True
            if states[name] == "PENDING" and int(info.get("Restarts", 0)) >= 1 and not job["released"]:
                # what the first run left behind, before the second starts
                job["checkpoints"] = sorted(p.name for p in job["out"].iterdir() if p.name.startswith("checkpoint-"))
                job["first_run_steps"] = [r["step"] for r in metrics(job["out"]) if "loss" in r]
                job["final_model_after_first_run"] = (job["out"] / "model.safetensors").exists()
                # SLURM holds a requeued job for cred_expire (10 s in the test cluster, 120 s by default) before it
                # may start again: forcing an earlier start races the revoked credential of the first run
                job["released"] = True
        if all(s in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") for s in states.values()):
            break
        if time.time() > deadline:
            logs = {n: j["log"].read_text()[-3000:] if j["log"].is_file() else "" for n, j in seen.items()}
            pytest.fail(f"jobs did not finish: {states}\n{logs}")
        time.sleep(0.3)
    for job in seen.values():
        job["info"] = cluster.job(job["id"])
    return seen


def test_finished_job_is_not_requeued(jobs):
    ref = jobs["reference"]
    assert ref["info"]["JobState"] == "COMPLETED" and ref["info"]["Restarts"] == "0", ref["log"].read_text()[-3000:]
    lines = sbatch_lines(ref["log"])
    assert len(lines) == 2, lines
    assert "fresh start" in lines[0] and "run finished its steps (exit 0): not requeuing" in lines[1]
    assert [r["step"] for r in metrics(ref["out"]) if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert (ref["out"] / "model.safetensors").is_file()


@pytest.mark.parametrize("how", list(SIGNALS))
def test_preempted_job_checkpoints_requeues_and_resumes_on_the_same_trajectory(jobs, how):
    job, ref = jobs[how], jobs["reference"]
    text = job["log"].read_text()
    assert job["info"]["JobState"] == "COMPLETED" and job["info"]["Restarts"] == "1", text[-4000:]
    # the first run stopped at a step boundary with exactly one complete checkpoint and no final model
    assert job["signaled"] and job["released"]
    assert len(job["checkpoints"]) == 1, job["checkpoints"]
    step = int(job["checkpoints"][0].removeprefix("checkpoint-"))
    assert SIGNAL_AFTER_STEP <= step < MAX_STEPS
    assert job["first_run_steps"] == list(range(1, step + 1))
    assert not job["final_model_after_first_run"]
    state = json.loads((job["out"] / f"checkpoint-{step}" / "trainer_state.json").read_text())
    assert state["step"] == step
    # one log line per event, in order
    lines = sbatch_lines(job["log"])
    expected = [r"run 1: launch: 1 node\(s\) x 2 process\(es\), rendezvous \S+:\d+, .* fresh start",
                rf"run 1: received SIG{how.upper()}: asking the run to checkpoint at the next step boundary",
                rf"run 1: run stopped on SIG{how.upper()} \(exit 0\), newest checkpoint-{step}: requeuing \(restart 1 ",
                rf"run 2: launch: .* resuming from checkpoint-{step}$",
                r"run 2: run finished its steps \(exit 0\): not requeuing"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.search(pattern, line), (pattern, line)
    assert f"resumed from {job['out'] / f'checkpoint-{step}'} at step {step}" in text
    # the whole job's loss trajectory equals the uninterrupted run's, step for step
    rows = [r for r in metrics(job["out"]) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, MAX_STEPS + 1))
    reference = {r["step"]: r["loss"] for r in metrics(ref["out"]) if "loss" in r}
    for row in rows:
        assert row["loss"] == pytest.approx(reference[row["step"]], rel=1e-5), row["step"]
    a, b = load_file(job["out"] / "model.safetensors"), load_file(ref["out"] / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert not (job["out"] / "STOP").exists()


def test_a_crash_without_progress_is_not_requeued(jobs):
    job = jobs["crash"]
    assert job["info"]["JobState"] == "FAILED" and job["info"]["Restarts"] == "0"
    lines = sbatch_lines(job["log"])
    assert re.search(r"run crashed \(exit [1-9]\d*\) with no checkpoint newer than at its start "
                     r"\(no checkpoint\): not requeuing", lines[-1]), lines


def test_a_bad_config_fails_before_launching(jobs):
    job = jobs["bad_config"]
    assert job["info"]["JobState"] == "FAILED" and job["info"]["ExitCode"] == "2:0"
    text = job["log"].read_text()
    assert "error: " in text and "learning_rat" in text
    assert sbatch_lines(job["log"])[-1].endswith("config did not resolve (error above): not starting")
    assert not job["out"].exists()


def test_jobs_sharing_a_node_get_different_rendezvous_ports(jobs):
    ports = {}
    for name, job in jobs.items():
        if name == "bad_config":
            continue
        match = re.search(r"rendezvous \S+:(\d+)", sbatch_lines(job["log"])[0])
        ports[name] = int(match.group(1))
    assert len(set(ports.values())) == len(ports), ports
