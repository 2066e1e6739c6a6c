"""train_gkd.py on tiny models: one on-policy decision per optimizer step on every process, both models scoring
the same tokens, accumulation invariance, learning from a teacher, and clear start-up errors."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ONE_THREAD, accelerate_launch, run_python, side_by_side  # one thread: the cores are shared
from train_gkd import (IGNORE_INDEX, choose_sequence_source, completion_row, generalized_jsd_loss, gkd_loss_sum,
                       prediction_mask)

RECIPE = "configs/recipe/quickstart_gkd.yaml"


def gkd_args(student: Path, teacher: Path, output_dir: Path, *extra: str) -> list[str]:
    return ["train_gkd.py", "--config", RECIPE, f"model_name_or_path={student}",
            f"teacher_model_name_or_path={teacher}", f"output_dir={output_dir}", "make_dataset_fn.num_samples=400",
            "eval_generation_reward=null", "logging_steps=1", "eval_steps=1000", "save_steps=0", *extra]


def metrics(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


@pytest.fixture(scope="module")
def other_tiny_model_dir(tmp_path_factory) -> Path:
    """Same architecture and tokenizer as tiny_model_dir, other random weights: a teacher for mechanics tests."""
    from make_tiny_model import save_tiny_model
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny_seed1", hidden_size=64, layers=2, heads=4, seed=1)


# ---------------------------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------------------------

def test_sequence_source_is_a_function_of_seed_and_step_with_probability_lmbda():
    draws = [choose_sequence_source(7, step, 0.3, False) for step in range(1, 4001)]
    torch.manual_seed(123)  # the global RNG plays no part
    assert draws == [choose_sequence_source(7, step, 0.3, False) for step in range(1, 4001)]
    assert set(draws) == {"student", "dataset"}
    assert 0.27 < draws.count("student") / len(draws) < 0.33
    assert {choose_sequence_source(7, s, 0.3, True) for s in range(1, 200)} == {"student", "teacher"}
    assert {choose_sequence_source(7, s, 1.0, True) for s in range(1, 200)} == {"student"}
    assert {choose_sequence_source(7, s, 0.0, False) for s in range(1, 200)} == {"dataset"}


def test_prediction_mask_marks_positions_that_predict_completion_tokens():
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX],
                           [IGNORE_INDEX, 7, 8, 9, 10]])
    expected = torch.tensor([[False, True, True, False, False],
                             [True, True, True, True, False]])
    assert torch.equal(prediction_mask(labels), expected)


def test_loss_reads_both_models_on_the_same_tokens_and_matches_full_logits(tiny_model_dir, other_tiny_model_dir):
    """The lean loss (logits only at completion positions, chunked) equals the reference loss on full logits."""
    from transformers import AutoModelForCausalLM

    from common.data import collate_sft
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    teacher = AutoModelForCausalLM.from_pretrained(other_tiny_model_dir).eval()
    rows = [completion_row([4, 20, 21, 22, 5], [30, 31, 2]), completion_row([4, 23, 5], [32, 33, 34, 35, 2])]
    batch = collate_sft(rows, pad_token_id=0)
    loss_sum, tokens = gkd_loss_sum(student, teacher, batch, beta=0.3, temperature=0.7)
    assert tokens == 8
    student_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    reference = generalized_jsd_loss(student_logits[:, :-1], teacher_logits[:, :-1], batch["labels"][:, 1:],
                                     beta=0.3, temperature=0.7, reduction="sum")
    assert loss_sum.item() == pytest.approx(reference.item(), rel=1e-5)
    assert loss_sum.item() > 0
    same, _ = gkd_loss_sum(student, student, batch, beta=0.3, temperature=0.7)  # a model against itself: 0
    assert abs(same.item()) < 1e-6


# ---------------------------------------------------------------------------------------------------------------------
# Runs of the real script
# ---------------------------------------------------------------------------------------------------------------------

def test_two_processes_take_one_decision_per_step_on_every_micro_step(tiny_model_dir, other_tiny_model_dir,
                                                                       tmp_path):
    """2 processes x 2 accumulation micro-steps: every micro-step of a step uses the same source on both ranks,
    the one `random.Random(seed + step)` gives; student and teacher both sample (seq_kd)."""
    seed, steps = 3, 6
    expected = {step: choose_sequence_source(seed, step, 0.5, True) for step in range(1, steps + 1)}
    assert set(expected.values()) == {"student", "teacher"}  # the seed exercises both samplers
    out = tmp_path / "two"
    result = accelerate_launch(gkd_args(tiny_model_dir, other_tiny_model_dir, out, f"seed={seed}",
                                        f"max_steps={steps}", "train_batch_size=8", "per_device_train_batch_size=2",
                                        "gradient_accumulation_steps=null", "lmbda=0.5", "seq_kd=true",
                                        "activate_debugging_logs=true", "learning_rate=1e-2", "beta=0.5"))
    assert_ok(result)
    traces = {rank: [json.loads(line) for line in (out / "gkd_trace" / f"rank{rank}.jsonl").read_text().splitlines()]
              for rank in (0, 1)}
    for rank, rows in traces.items():
        assert [(r["step"], r["micro_step"]) for r in rows] == [(s, m) for s in range(1, steps + 1) for m in (0, 1)]
        assert all(r["source"] == expected[r["step"]] for r in rows), (rank, rows)
        assert all(r["sequences"] == 2 and r["completion_tokens"] > 0 for r in rows)
    logged = {r["step"]: r for r in metrics(out) if "loss" in r}
    assert {s: (r["on_policy"], r["seq_kd"]) for s, r in logged.items()} == {
        s: (float(src == "student"), float(src == "teacher")) for s, src in expected.items()}
    assert all(r["loss"] > 0 for r in logged.values())
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


# seed 3 draws both sources in steps 1-4 and an on-policy step among steps 3-4
STRAIGHT = ["seed=3", "max_steps=4", "train_batch_size=4", "gradient_accumulation_steps=null", "lmbda=0.5", "beta=0.5",
            "learning_rate=1e-2", "save_steps=2", "save_total_limit=3"]


@pytest.fixture(scope="module")
def straight_runs(tiny_model_dir, other_tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Two 4-step runs side by side: 1 micro-batch of 4 ("accum1", checkpoints every 2 steps) and 4 accumulated
    micro-batches of 1 ("accum4"). The accumulation and resume tests read them."""
    root = tmp_path_factory.mktemp("gkd_straight")
    runs = {"accum1": "per_device_train_batch_size=4", "accum4": "per_device_train_batch_size=1"}
    results = side_by_side(*[lambda name=name, batch=batch: run_python(
        gkd_args(tiny_model_dir, other_tiny_model_dir, root / name, *STRAIGHT, batch), env=ONE_THREAD)
        for name, batch in runs.items()])
    for result in results:
        assert_ok(result)
    return {name: root / name for name in runs}


def test_gradient_accumulation_invariance_with_on_policy_steps(straight_runs):
    """1 micro-batch x 4 accumulation steps == 4 x 1 (same losses and weights), on-policy steps included."""
    assert {choose_sequence_source(3, s, 0.5, False) for s in range(1, 5)} == {"student", "dataset"}
    accum4, accum1 = straight_runs["accum4"], straight_runs["accum1"]
    rows4 = [r for r in metrics(accum4) if "loss" in r]
    rows1 = [r for r in metrics(accum1) if "loss" in r]
    assert [r["on_policy"] for r in rows4] == [r["on_policy"] for r in rows1]
    assert [r["loss"] for r in rows4] == pytest.approx([r["loss"] for r in rows1], rel=1e-4)
    a, b = weights(accum4), weights(accum1)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_resume_repeats_the_same_decisions_and_samples(straight_runs, tiny_model_dir, other_tiny_model_dir, tmp_path):
    """Decisions and sampling seeds depend on (seed, step) only: a run resumed at step 2 retraces the straight run."""
    assert "student" in {choose_sequence_source(3, s, 0.5, False) for s in (3, 4)}
    straight, resumed = straight_runs["accum1"], tmp_path / "resumed"
    resumed.mkdir()
    import shutil
    shutil.copytree(straight / "checkpoint-2", resumed / "checkpoint-2")
    assert_ok(run_python(gkd_args(tiny_model_dir, other_tiny_model_dir, resumed, *STRAIGHT,
                                  "per_device_train_batch_size=4", "resume_from_checkpoint=latest"), env=ONE_THREAD))
    straight_rows = {r["step"]: r for r in metrics(straight) if "loss" in r}
    resumed_rows = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in resumed_rows] == [3, 4]
    for row in resumed_rows:
        assert row["on_policy"] == straight_rows[row["step"]]["on_policy"]
        assert row["completion_length"] == pytest.approx(straight_rows[row["step"]]["completion_length"])
        assert row["loss"] == pytest.approx(straight_rows[row["step"]]["loss"], rel=1e-5)
    a, b = weights(straight), weights(resumed)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


TEACHER_SFT_CONFIG = """\
# launch: train_sft.py
defaults:
  - model: tiny
  - data: arithmetic
  - trainer: base_sft
make_dataset_fn: {_target_: common.data.make_arithmetic_dataset, num_samples: 4000, max_operand: 99, operators: "+"}
max_steps: 500
train_batch_size: 128
per_device_train_batch_size: 128
learning_rate: 3.0e-3
lr_scheduler_type: cosine
warmup_ratio: 0.02
max_seq_length: 64
packing: false
bf16: false
do_eval: false
eval_generation_reward: null
save_steps: 250
save_total_limit: 2
logging_steps: 100
"""


@pytest.fixture(scope="module")
def sft_run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A short train_sft.py run on the tiny model (its own settings, independent of the quickstart recipe): the
    final model is the teacher, its halfway checkpoint the student (a student with some supervised training, as in
    the GKD paper)."""
    root = tmp_path_factory.mktemp("teacher")
    config = root / "teacher_sft.yaml"
    config.write_text(TEACHER_SFT_CONFIG)
    out = root / "sft"
    result = run_python(["train_sft.py", "--config", str(config), f"model_name_or_path={tiny_model_dir}",
                         f"output_dir={out}"], env=ONE_THREAD)
    assert_ok(result)
    assert [r["step"] for r in metrics(out)][-1] == 500  # not stopped early (e.g. by a stray SIGTERM)
    assert (out / "checkpoint-250" / "model.safetensors").is_file()
    return out


def test_student_distils_the_teacher_and_gets_more_accurate(sft_run_dir, tmp_path):
    """Default beta (0.5) and lmbda (0.5): the JSD falls and held-out greedy accuracy rises toward the teacher's."""
    out = tmp_path / "distil"
    result = run_python(gkd_args(sft_run_dir / "checkpoint-250", sft_run_dir, out, "make_dataset_fn.num_samples=4000",
                                 "max_steps=150", "train_batch_size=64", "per_device_train_batch_size=64",
                                 "beta=0.5", "lmbda=0.5", "learning_rate=1.5e-3", "eval_generation_reward=arithmetic",
                                 "eval_generation_samples=200", "logging_steps=10", "do_eval=true", "eval_steps=150"),
                        env=ONE_THREAD)
    assert_ok(result)
    rows = metrics(out)
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 15
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3, losses
    assert any(r["on_policy"] == 1.0 for r in rows if "loss" in r)
    assert any("eval/loss" in r for r in rows)
    accuracy = [r for r in rows if "eval/greedy_accuracy" in r]
    before, after = accuracy[0]["eval/greedy_accuracy"], accuracy[-1]["eval/greedy_accuracy"]
    teacher = accuracy[0]["eval/teacher_greedy_accuracy"]
    assert teacher > before + 0.1, (before, teacher)  # there is something to distil
    assert after >= before + 0.05, (before, after, teacher)
    assert "held-out greedy accuracy" in result.stdout and "student after GKD" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear message, non-zero exit, nothing written
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def other_vocabulary_model_dir(tmp_path_factory) -> Path:
    """Same vocabulary size, other token ids: a vocab_size comparison alone would not notice."""
    import make_tiny_model
    original = make_tiny_model.CHARACTERS
    make_tiny_model.CHARACTERS = list(reversed(original))
    try:
        return make_tiny_model.save_tiny_model(tmp_path_factory.mktemp("models") / "reversed", hidden_size=64,
                                               layers=2, heads=4, seed=0)
    finally:
        make_tiny_model.CHARACTERS = original


BAD_INPUT = {
    "missing_teacher": r"teacher_model_name_or_path.*no such local model directory",
    "vocabulary": r"student tokenizer .* and the teacher tokenizer .* differ",
    "lmbda": r"`lmbda` must be a number in \[0, 1\], got 1.5",
    "beta": r"`beta` must be a number in \[0, 1\], got -0.1",
    "chat_last_turn": r"chat.jsonl:2: the last message must be the assistant's",
}


@pytest.fixture(scope="module")
def bad_input_runs(tiny_model_dir, other_vocabulary_model_dir, tmp_path_factory) -> dict:
    """One run per BAD_INPUT case, side by side: case -> (output_dir, result)."""
    root = tmp_path_factory.mktemp("gkd_bad_input")
    launches = {}
    for case in BAD_INPUT:
        teacher, extra = tiny_model_dir, []
        if case == "missing_teacher":
            teacher = root / "no_teacher_here"
        elif case == "vocabulary":
            teacher = other_vocabulary_model_dir
        elif case == "lmbda":
            extra = ["lmbda=1.5"]
        elif case == "beta":
            extra = ["beta=-0.1"]
        else:
            data = root / "chat.jsonl"
            data.write_text(json.dumps({"messages": [{"role": "user", "content": "1+1="},
                                                     {"role": "assistant", "content": "2"}]}) + "\n"
                            + json.dumps({"messages": [{"role": "user", "content": "2+2="}]}) + "\n")
            extra = [f"dataset_id_or_path={data}", "make_dataset_fn={}"]
        launches[case] = gkd_args(tiny_model_dir, teacher, root / f"never_{case}", *extra)
    results = side_by_side(*[lambda args=args: run_python(args, env=ONE_THREAD) for args in launches.values()])
    return {case: (root / f"never_{case}", result) for case, result in zip(launches, results)}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_before_anything_is_written(case, bad_input_runs):
    out, result = bad_input_runs[case]
    assert result.returncode != 0
    assert re.search(BAD_INPUT[case], result.stderr), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()
