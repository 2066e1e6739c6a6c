#!/usr/bin/env bash
# CPU quickstart: build tiny models, teach one 2-digit addition with SFT, improve it with GRPO against a verifier,
# distil it into a smaller student with GKD, and train a teacher whose hints make a frozen student solve what it
# gets wrong alone. Each step prints a held-out accuracy table.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# one thread per process: tiny models gain nothing from more, and oversubscribed cores stall badly
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/make_tiny_model.py --output tiny_models/llama-tiny
python scripts/make_tiny_model.py --output tiny_models/llama-tiny-student --hidden-size 64 --layers 2

# The teacher demo (step 5) needs none of steps 2-4, so it runs beside them on the second core; its log is
# outputs/quickstart_teacher.log and its table is printed last.
teacher_demo() {
    python scripts/make_teacher_demo.py data
    python train_sft.py --config configs/recipe/quickstart_teacher_student.yaml overwrite_output_dir=true
    python train_sft.py --config configs/recipe/quickstart_teacher_init.yaml overwrite_output_dir=true
    python train_grpo.py --config configs/recipe/quickstart_teacher.yaml overwrite_output_dir=true
}
mkdir -p outputs
teacher_demo > outputs/quickstart_teacher.log 2>&1 &
teacher_pid=$!
# an interrupted or failed quickstart stops the demo too (its running step first, then the demo's shell)
trap 'pkill -TERM -P "$teacher_pid" 2>/dev/null; kill "$teacher_pid" 2>/dev/null || true' EXIT

# a re-run replaces the previous quickstart's outputs (a training run refuses that unless told to)
python train_sft.py --config configs/recipe/quickstart_sft.yaml overwrite_output_dir=true
python train_grpo.py --config configs/recipe/quickstart_grpo.yaml overwrite_output_dir=true
python train_gkd.py --config configs/recipe/quickstart_gkd.yaml overwrite_output_dir=true

echo "waiting for the teacher demo (outputs/quickstart_teacher.log) ..."
if ! wait "$teacher_pid"; then
    tail -n 30 outputs/quickstart_teacher.log
    echo "error: the teacher demo failed; its log is outputs/quickstart_teacher.log" >&2
    exit 1
fi
trap - EXIT
grep -A 3 '^| teacher |' outputs/quickstart_teacher.log
