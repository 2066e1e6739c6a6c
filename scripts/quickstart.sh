#!/usr/bin/env bash
# CPU quickstart: build tiny models, teach one 2-digit addition with SFT, improve it with GRPO against a verifier,
# then distil it into a smaller student with GKD, and finally train a teacher with GRPO whose hints make a frozen
# student solve problems it gets wrong alone. Each step prints a held-out accuracy table.
set -euo pipefail
cd "$(dirname "$0")/.."
export WANDB_MODE=${WANDB_MODE:-disabled} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
# one thread per process: tiny models gain nothing from more, and oversubscribed cores stall badly
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python scripts/make_tiny_model.py --output tiny_models/llama-tiny
python scripts/make_tiny_model.py --output tiny_models/llama-tiny-student --hidden-size 64 --layers 2
python train_sft.py --config configs/recipe/quickstart_sft.yaml
# The teacher demo's two models (its student starts from the SFT model above) train on the second core while
# GRPO and GKD run on the first.
teacher_log=outputs/quickstart_teacher_models.log
(
  python scripts/make_teacher_demo.py data
  python train_sft.py --config configs/recipe/quickstart_teacher_student.yaml
  python train_sft.py --config configs/recipe/quickstart_teacher_init.yaml
  python scripts/make_teacher_demo.py check > outputs/quickstart_teacher_check.txt
) > "$teacher_log" 2>&1 &
teacher_models=$!
trap 'pkill -P "$teacher_models" 2>/dev/null; kill "$teacher_models" 2>/dev/null || true' EXIT
python train_grpo.py --config configs/recipe/quickstart_grpo.yaml
python train_gkd.py --config configs/recipe/quickstart_gkd.yaml
if ! wait "$teacher_models"; then
  echo "error: building the teacher demo's student and teacher failed; see $teacher_log" >&2
  exit 1
fi
trap - EXIT
cat outputs/quickstart_teacher_check.txt
python train_grpo.py --config configs/recipe/quickstart_teacher.yaml
