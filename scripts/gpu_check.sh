#!/usr/bin/env bash
# GPU check: a short bf16 SFT, GRPO and GKD run on a Qwen3-shaped random model built here (nothing downloaded),
# flash-attention 2 where flash-attn is installed, else sdpa. Writes OUT_DIR/gpu_check.json with tokens/s, MFU and
# peak memory per script (and each run's output under OUT_DIR/runs/).
#   scripts/gpu_check.sh OUT_DIR             # needs a CUDA GPU
#   scripts/gpu_check.sh OUT_DIR --cpu-smoke # no GPU: the same pipeline on a tiny fp32 model, to check the script
set -euo pipefail
usage="usage: scripts/gpu_check.sh OUT_DIR [--cpu-smoke]"
out=${1:?$usage}
mode=${2:-gpu}
case "$mode" in gpu|--cpu-smoke) ;; *) echo "$usage" >&2; exit 2;; esac
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export WANDB_MODE=disabled HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True PYTHONPATH=.
if [ "$mode" = gpu ] && ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "error: no CUDA device visible to torch; on a CPU machine run: scripts/gpu_check.sh $out --cpu-smoke" >&2
  exit 2
fi
mkdir -p "$out/runs"
model="$out/model"

# ----- the model: Qwen3-1.7B's shape, fewer layers (GPU) or a tiny one (CPU smoke) -------------------------------------
"$python" - "$model" "$mode" <<'EOF'
import sys
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM
sys.path.insert(0, "scripts")
from make_tiny_model import build_tiny_tokenizer

path, mode = sys.argv[1], sys.argv[2]
tokenizer = build_tiny_tokenizer()  # character-level: prompts are short, but vocab and shapes are the model's
gpu = mode == "gpu"
shape = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=8, num_attention_heads=16,
             num_key_value_heads=8, head_dim=128) if gpu else \
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=4096, tie_word_embeddings=True,
                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                     **shape)
for seed, where in ((0, path), (1, path + "-teacher")):  # GKD's teacher: the same shape, other weights
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(where)
    tokenizer.save_pretrained(where)
print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {path}", file=sys.stderr)
EOF

if [ "$mode" = gpu ]; then
  attn=$("$python" -c 'import importlib.util as u; print("flash_attention_2" if u.find_spec("flash_attn") else "sdpa")')
  common=(bf16=true "attn_implementation=$attn" max_steps=8 logging_steps=1 save_steps=0)
  sft=(packing=true max_seq_length=1024 train_batch_size=16 per_device_train_batch_size=16
       make_dataset_fn.num_samples=20000)
  grpo=(train_batch_size=64 per_device_train_batch_size=64 num_generations=8 max_completion_length=64
        make_dataset_fn.num_samples=2000)
  gkd=(train_batch_size=64 per_device_train_batch_size=64 max_new_tokens=64 max_seq_length=128
       make_dataset_fn.num_samples=2000)
else
  attn=sdpa
  common=(bf16=false attn_implementation=sdpa max_steps=2 logging_steps=1 save_steps=0)
  sft=(packing=true max_seq_length=128 train_batch_size=4 per_device_train_batch_size=4 make_dataset_fn.num_samples=200)
  grpo=(train_batch_size=16 per_device_train_batch_size=16 num_generations=4 max_completion_length=8
        make_dataset_fn.num_samples=100)
  gkd=(train_batch_size=8 per_device_train_batch_size=8 max_new_tokens=8 max_seq_length=64
       make_dataset_fn.num_samples=100)
fi

# One run: the script's own main, with the wall time of every logged step and the peak CUDA memory recorded.
run() {
  local name=$1 script=$2; shift 2
  echo "gpu_check: $name ($script, attn $attn)" >&2
  "$python" - "$out/runs/$name.stats.json" "$script" "$@" <<'EOF'
import json, runpy, sys, time
import torch
import common.tracking as tracking

stats_path, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
stamps = []
log = tracking.Tracker.log
def stamped(self, metrics, step):
    if "loss" in metrics:
        stamps.append((step, time.time(), metrics))
    return log(self, metrics, step)
tracking.Tracker.log = stamped
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
json.dump({"stamps": [(s, t, {k: v for k, v in m.items() if isinstance(v, (int, float))}) for s, t, m in stamps],
           "peak_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"},
          open(stats_path, "w"))
EOF
}
run sft train_sft.py --config configs/recipe/quickstart_sft.yaml "model_name_or_path=$model" \
  "output_dir=$out/runs/sft" do_eval=false eval_generation_reward=null "${common[@]}" "${sft[@]}"
run grpo train_grpo.py --config configs/recipe/quickstart_grpo.yaml "model_name_or_path=$model" \
  "output_dir=$out/runs/grpo" use_vllm=false do_eval=false eval_on_start=false beta=0.04 \
  'reward_funcs=[format]' 'format_pattern=\d.*' "${common[@]}" "${grpo[@]}"
run gkd train_gkd.py --config configs/recipe/quickstart_gkd.yaml "model_name_or_path=$model" \
  "teacher_model_name_or_path=$model-teacher" "output_dir=$out/runs/gkd" do_eval=false eval_generation_reward=null \
  "${common[@]}" "${gkd[@]}"

# ----- summary -------------------------------------------------------------------------------------------------------
"$python" - "$out" "$model" "$attn" "$mode" <<'EOF'
import json, math, statistics, sys
from pathlib import Path
import yaml
from safetensors import safe_open

out, model, attn, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
with safe_open(model / "model.safetensors", "pt") as f:
    params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
# dense bf16 peak FLOP/s by card name (vendor datasheets, no sparsity)
PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
result = {"mode": mode, "attn_implementation": attn, "parameters": params, "scripts": {}}
for name in ("sft", "grpo", "gkd"):
    stats = json.loads((out / "runs" / f"{name}.stats.json").read_text())
    stamps = stats["stamps"]
    result["device"] = stats["device"]
    steps = [(t1 - t0) for (_, t0, _), (_, t1, _) in zip(stamps, stamps[1:])]  # first step: warm-up, not timed
    step_seconds = statistics.median(steps) if steps else None
    rows = [m for _, _, m in stamps[1:]]
    if name == "gkd":  # GKD logs completion tokens per sequence; count the batch's completion tokens
        cfg = yaml.safe_load((out / "runs" / name / "config.yaml").read_text())
        tokens = statistics.mean(m["completion_length"] for m in rows) * cfg["train_batch_size"] if rows else None
        tps = tokens / step_seconds if tokens and step_seconds else None
        what = "completion tokens per second (teacher and student forward, student backward)"
    else:
        tps = statistics.mean(m["tokens_per_second"] for m in rows) if rows else None
        what = "non-padding tokens per second as the script logs it"
    peak = next((v for k, v in PEAK.items() if k in stats["device"]), None)
    result["scripts"][name] = {
        "step_seconds": step_seconds, "tokens_per_second": tps, "tokens_per_second_means": what,
        "mfu": 6 * params * tps / peak if tps and peak else None,
        "peak_memory_gib": stats["peak_memory_bytes"] / 2**30 if stats["peak_memory_bytes"] else None,
        "loss": [m["loss"] for _, _, m in stamps],
    }
result["mfu_means"] = "6 x parameters x tokens_per_second / the card's dense bf16 peak (null if the card is unknown)"
(out / "gpu_check.json").write_text(json.dumps(result, indent=2))
print(json.dumps({k: {kk: v[kk] for kk in ("tokens_per_second", "mfu", "peak_memory_gib")}
                  for k, v in result["scripts"].items()}, indent=2))
print(f"wrote {out / 'gpu_check.json'}", file=sys.stderr)
EOF
