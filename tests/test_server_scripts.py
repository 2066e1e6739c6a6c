"""The server launch scripts' plans, without starting servers: slurm/grpo_with_server.sbatch in its dry-run mode
(a server node and two training nodes named by NODES) and scripts/launch_with_server.sh's refusals. The launcher
itself runs end to end in tests/test_vllm_server.py."""
from __future__ import annotations

import os
import subprocess

from conftest import ROOT


def run(args: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "VENV": "", **env})


def test_sbatch_dry_run_serves_on_the_first_node_and_trains_on_the_others():
    result = run(["slurm/grpo_with_server.sbatch", "configs/recipe/teacher_rcl.yaml", "max_steps=3"],
                 DRY_RUN="1", NODES="srv trainA trainB", GPUS_PER_NODE="2", SERVER_PORT="31000")
    assert result.returncode == 0, result.stderr[-3000:]
    server_line, train_line = [line for line in result.stdout.splitlines() if line.startswith("+ srun")]
    assert "-w srv" in server_line and server_line.count("vllm.entrypoints.openai.api_server") == 2
    assert "--port 31000" in server_line and "--port 31001" in server_line
    # the policy's server receives weights over NCCL; the student's (last GPU) has no weight transfer
    assert server_line.count("--weight-transfer-config") == 1
    assert "-w trainA,trainB" in train_line and "--num_processes 4" in train_line
    for key in ("use_vllm_server=true", "vllm_host=srv", "vllm_port=31000", "vllm_transfer_address=trainA",
                "student_vllm_server=srv:31001", "max_steps=3"):
        assert key in train_line, key


def test_sbatch_needs_a_server_node_and_a_training_node():
    result = run(["slurm/grpo_with_server.sbatch", "configs/recipe/quickstart_grpo.yaml"], DRY_RUN="1", NODES="one")
    assert result.returncode == 2 and "needs >= 2 nodes" in result.stderr


def test_launcher_refuses_bad_arguments_before_starting_anything(tmp_path):
    result = run(["scripts/launch_with_server.sh", "0", "1", "configs/recipe/quickstart_grpo.yaml"])
    assert result.returncode == 2 and "usage" in result.stderr
    # the teacher recipe's student server needs a second server
    result = run(["scripts/launch_with_server.sh", "1", "1", "configs/recipe/teacher_rcl.yaml"],
                 LAUNCH_LOG_DIR=str(tmp_path / "logs"))
    assert result.returncode == 2 and "N_SERVER_GPUS >= 2" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "logs").exists()
