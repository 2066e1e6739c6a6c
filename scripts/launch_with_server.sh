#!/bin/bash
# GRPO with vLLM's own server(s) on one machine: N_SERVER_GPUS servers (one GPU each), training on the next
# N_TRAIN_GPUS GPUs, weights pushed to the servers after every optimizer step (common/vllm_server.py).
#   scripts/launch_with_server.sh N_SERVER_GPUS N_TRAIN_GPUS RECIPE [key=value ...]
#   scripts/launch_with_server.sh 1 1 configs/recipe/quickstart_grpo.yaml          # CPU: "GPUs" are processes
#   scripts/launch_with_server.sh 2 6 configs/recipe/teacher_rcl.yaml              # policy server + student server
# The servers serve the recipe's model_name_or_path; with student_engine=server (and no student_vllm_server given)
# the last server serves the student (student_model, or the initial policy weights) and is never synced.
# The launcher starts, health-polls and stops only its own processes (by pid, on exit), never edits tracked files.
# Environment knobs:
#   LAUNCH_LOG_DIR         server logs (default: a fresh temporary directory, printed)
#   LAUNCH_BASE_PORT       first server port (default: a free port; the others follow it)
#   LAUNCH_SERVER_TIMEOUT  seconds to wait for a server to answer /health (default 900)
#   ACCELERATE_CONFIG      accelerate config for N_TRAIN_GPUS > 1 (default accelerate_configs/zero3.yaml on GPUs,
#                          accelerate_configs/cpu_2proc.yaml, gloo, on CPU)
#   VLLM_SERVER_ARGS       extra arguments for every server (e.g. "--gpu-memory-utilization 0.85")
set -uo pipefail
usage="usage: scripts/launch_with_server.sh N_SERVER_GPUS N_TRAIN_GPUS RECIPE [key=value ...]"
n_servers=${1:?$usage}
n_train=${2:?$usage}
recipe=${3:?$usage}
shift 3
[[ $n_servers =~ ^[1-9][0-9]*$ && $n_train =~ ^[1-9][0-9]*$ ]] || { echo "error: $usage" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)   # run from the repo root (relative paths in recipes are from there)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "[launch_with_server] $*"; }

# The resolved run: which models to serve, whether the student gets a server.
if ! plan=$(WORLD_SIZE=$n_train python - "$recipe" "$@" <<'EOF'
import sys
import train_grpo
from common.config import load_config
cfg = load_config(train_grpo.Config, ["--config", *sys.argv[1:], "use_vllm_server=false"])
student = cfg.trainer_args is not None and cfg.student_engine == "server" and not cfg.student_vllm_server
print(cfg.model_name_or_path, int(student), cfg.student_model or cfg.model_name_or_path,
      cfg.vllm_max_model_len or 0, cfg.vllm_dtype, cfg.seed)
EOF
); then
  log "the config did not resolve (error above): nothing started"
  exit 2
fi
read -r model student_server student_model max_len dtype seed <<<"$plan"
n_policy=$((n_servers - student_server))
if [ "$n_policy" -lt 1 ]; then
  echo "error: student_engine=server needs N_SERVER_GPUS >= 2 (one policy server, one student server)" >&2
  exit 2
fi

gpus=0
if command -v nvidia-smi >/dev/null 2>&1 && python -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  gpus=$(nvidia-smi -L | wc -l)
  if [ $((n_servers + n_train)) -gt "$gpus" ]; then
    echo "error: $n_servers server + $n_train training GPUs asked, $gpus on this machine" >&2
    exit 2
  fi
fi
log_dir=${LAUNCH_LOG_DIR:-$(mktemp -d -t launch_with_server.XXXXXX)}
mkdir -p "$log_dir"
base_port=${LAUNCH_BASE_PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')}
timeout_s=${LAUNCH_SERVER_TIMEOUT:-900}

pids=()
train_pid=""
stop_children() {   # only what this script started, by pid
  local pid
  trap - EXIT INT TERM
  if [ -n "$train_pid" ] && kill -0 "$train_pid" 2>/dev/null; then kill -TERM "$train_pid" 2>/dev/null; fi
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for pid in "${pids[@]}" $train_pid; do
    for _ in $(seq 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null; fi
  done
  [ ${#pids[@]} -eq 0 ] || log "stopped server pid(s) ${pids[*]}"
}
trap stop_children EXIT
trap 'exit 143' INT TERM

# ----- servers -----------------------------------------------------------------------------------------------------
transport=gloo
device_args=(--dtype float32 --enforce-eager)   # CPU: vLLM's CPU build in float32, as the trainer
if [ "$gpus" -gt 0 ]; then transport=nccl; device_args=(); fi
[ "$dtype" = auto ] || device_args+=(--dtype "$dtype")
[ "$max_len" -gt 0 ] && device_args+=(--max-model-len "$max_len")
ports=()
for ((i = 0; i < n_servers; i++)); do
  port=$((base_port + i))
  ports+=("$port")
  served=$model
  transfer=(--worker-extension-cls common.vllm_server_worker.GlooWeightTransferExtension
            --weight-transfer-config "{\"backend\": \"$transport\"}")
  if [ "$student_server" = 1 ] && [ "$i" -eq $((n_servers - 1)) ]; then served=$student_model; transfer=(); fi
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$([ "$gpus" -gt 0 ] && echo "$i" || echo "") VLLM_SERVER_DEV_MODE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1} \
    python -m vllm.entrypoints.openai.api_server --model "$served" --host 127.0.0.1 --port "$port" \
      --seed "$seed" --enable-scale-out --logprobs-mode processed_logprobs "${device_args[@]}" "${transfer[@]}" \
      ${VLLM_SERVER_ARGS:-} >"$log_dir/server_$i.log" 2>&1 &
  pids+=("$!")
  log "server $i (pid $!) serving $served on 127.0.0.1:$port, log $log_dir/server_$i.log"
done

deadline=$(($(date +%s) + timeout_s))
for ((i = 0; i < n_servers; i++)); do
  until python -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:${ports[$i]}/health', timeout=5)" 2>/dev/null; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      echo "error: server $i (127.0.0.1:${ports[$i]}) exited while starting; the end of its log:" >&2
      tail -n 30 "$log_dir/server_$i.log" >&2
      exit 1
    fi
    if [ "$(date +%s)" -gt "$deadline" ]; then
      echo "error: server $i (127.0.0.1:${ports[$i]}) not healthy after ${timeout_s}s (log $log_dir/server_$i.log)" >&2
      exit 1
    fi
    sleep 2
  done
done
log "${n_servers} server(s) healthy"

# ----- training ----------------------------------------------------------------------------------------------------
extra=()
for ((i = 1; i < n_policy; i++)); do extra+=("127.0.0.1:${ports[$i]}"); done
server_keys=(use_vllm_server=true vllm_host=127.0.0.1 "vllm_port=${ports[0]}" "vllm_servers=[$(IFS=,; echo "${extra[*]}")]"
             "vllm_server_transport=$transport")
[ "$student_server" = 1 ] && server_keys+=("student_vllm_server=127.0.0.1:${ports[$((n_servers - 1))]}")
if [ "$n_train" -gt 1 ]; then
  devices=""
  if [ "$gpus" -gt 0 ]; then devices=$(seq -s, "$n_servers" $((n_servers + n_train - 1))); fi
  main_port=$(python -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
  accelerate_args=(--num_processes "$n_train" --main_process_port "$main_port")
  if [ "$gpus" -gt 0 ]; then
    accelerate_args+=(--config_file "${ACCELERATE_CONFIG:-$repo/accelerate_configs/zero3.yaml}")
  else   # CPU processes over gloo (`--cpu` alone would start one process)
    export ACCELERATE_USE_CPU=true
    accelerate_args+=(--config_file "${ACCELERATE_CONFIG:-$repo/accelerate_configs/cpu_2proc.yaml}")
  fi
  CUDA_VISIBLE_DEVICES=$devices accelerate launch "${accelerate_args[@]}" "$repo/train_grpo.py" --config "$recipe" "$@" \
    "${server_keys[@]}" &
else
  CUDA_VISIBLE_DEVICES=$([ "$gpus" -gt 0 ] && echo "$n_servers" || echo "") \
    python "$repo/train_grpo.py" --config "$recipe" "$@" "${server_keys[@]}" &
fi
train_pid=$!
log "training (pid $train_pid) on $n_train $([ "$gpus" -gt 0 ] && echo GPU\(s\) || echo process\(es\))"
wait "$train_pid"
status=$?
train_pid=""
log "training exited with status $status"
exit "$status"
