"""Teacher GRPO: templates, the episode on tiny models, the teacher rewards, end-to-end runs, bad input."""
from __future__ import annotations

import json
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from conftest import ONE_THREAD, ROOT, accelerate_launch, run_python, side_by_side
from openai_stub_server import OpenAIStubServer, StubReply

from common.config import ConfigError, load_config
from common.rewards import RewardInput, TeachingTrajectory
from common.teaching import (DEFAULT_TEMPLATES, TeacherArgs, check_teacher_args, extract_teaching, fill_template,
                             user_prompt_text)

PRESET = ROOT / "configs/trainer/teacher_grpo.yaml"


# ---------------------------------------------------------------------------------------------
# Templates
# ---------------------------------------------------------------------------------------------
def test_preset_templates_are_the_spec_defaults_and_fill_without_touching_other_braces():
    preset = yaml.safe_load(PRESET.read_text())["trainer_args"]
    for name, text in DEFAULT_TEMPLATES.items():
        assert preset[name] == text, name
    teaching = fill_template(preset["teacher_adaptive_template"], question='Is {"a": 1} valid JSON? {x}',
                             approach="use {question} and \\frac{1}{2}")
    # inserted text is never expanded, and the template's own text stays as written
    assert 'Question: Is {"a": 1} valid JSON? {x}\n' in teaching
    assert "Student's approach: use {question} and \\frac{1}{2}\n" in teaching
    assert "<teaching>\n[Only guidance to student - no answers]\n</teaching>" in teaching
    json_template = 'Reply {"answer": <n>} to: {question} {"nested": {"k": [1, 2]}}'
    assert fill_template(json_template, question="2+2") == 'Reply {"answer": <n>} to: 2+2 {"nested": {"k": [1, 2]}}'
    check_teacher_args(TeacherArgs(student_baseline_template=json_template))


@pytest.mark.parametrize("key,template,message", [
    ("teacher_adaptive_template", "Q: {question} A: {answer}", r"unknown placeholder\(s\) \{answer\}"),
    ("student_with_teaching_template", "{question} {approach}", r"unknown placeholder\(s\) \{approach\}"),
    ("student_diagnostic_template", "Describe your plan.", r"has no \{question\}"),
])
def test_a_bad_template_is_a_config_error(key, template, message):
    with pytest.raises(ConfigError, match=message):
        check_teacher_args(TeacherArgs(**{key: template}))


def test_teaching_extraction():
    assert extract_teaching("<thinking>x</thinking>\n<teaching>\n carry the 1 \n</teaching><teaching>no</teaching>") \
        == ("carry the 1", True)
    assert extract_teaching("  just text  ") == ("just text", False)


# ---------------------------------------------------------------------------------------------
# One episode on tiny models
# ---------------------------------------------------------------------------------------------
def encode(tokenizer, content: str) -> list[int]:
    return tokenizer(user_prompt_text(tokenizer, content), add_special_tokens=False).input_ids


class RecordingEngine:
    """The real HF engine; records the prompts of each generate call."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []

    def generate(self, prompt_ids, params):
        self.calls.append([list(p) for p in prompt_ids])
        return self.engine.generate(prompt_ids, params)


def tiny(path, seed=None):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    if seed is not None:   # another model on the same tokenizer
        torch.manual_seed(seed)
        for parameter in model.parameters():
            parameter.data.normal_(0, 0.2)
    return model.eval()


def test_one_episode_shares_the_students_work_and_trains_on_the_teacher_prompt(tiny_model_dir, tiny_tokenizer):
    import torch

    from common.data import Example
    from common.logprobs import completion_logprobs, rollout_batch
    from common.rollout import HFGenerateEngine, SamplingParams
    from common.teaching import EngineStudent, TeachingLoop, answer_checker

    student_model, policy = tiny(tiny_model_dir), tiny(tiny_model_dir, seed=1)
    student_engine = RecordingEngine(HFGenerateEngine(student_model, tiny_tokenizer))
    teacher_engine = RecordingEngine(HFGenerateEngine(policy, tiny_tokenizer))
    args = TeacherArgs(max_probe_tokens=6, student_max_new_tokens=4)
    loop = TeachingLoop(args, EngineStudent(student_engine, tiny_tokenizer), teacher_engine, tiny_tokenizer,
                        answer_checker("arithmetic", None))
    examples = [Example(prompt=[{"role": "user", "content": q}], ground_truth=a)
                for q, a in (("12+30=", "42"), ("55+19=", "74"))]
    group = 3
    batch = loop.run(examples, SamplingParams(temperature=1.0, max_new_tokens=6, num_generations=group, seed=0))

    # baseline and diagnostic: one student call each with one prompt per question; then one answer per sample
    baseline_call, diagnostic_call, answer_call = student_engine.calls
    assert len(baseline_call) == len(diagnostic_call) == 2 and len(answer_call) == 2 * group
    assert batch.student_generations == 2 + 2 + 2 * group
    for call, template in ((baseline_call, "student_baseline_template"), (diagnostic_call, "student_diagnostic_template")):
        assert call == [encode(tiny_tokenizer, fill_template(getattr(args, template), question=q))
                        for q in ("12+30=", "55+19=")]
    (teacher_call,) = teacher_engine.calls
    assert len(teacher_call) == 2   # one prompt per question, sampled G times
    for i, context in enumerate(batch.contexts):
        expected = user_prompt_text(tiny_tokenizer, fill_template(args.teacher_adaptive_template,
                                                                  question=context.question, approach=context.approach))
        assert context.teacher_prompt == expected and "Student's approach: " + context.approach in expected
        assert teacher_call[i] == tiny_tokenizer(expected, add_special_tokens=False).input_ids
    assert len(batch.rollouts) == len(batch.inputs) == 2 * group
    for rollout, item in zip(batch.rollouts, batch.inputs):
        context = batch.contexts[rollout.prompt_index]
        episode = item.teaching
        assert rollout.prompt_ids == tiny_tokenizer(context.teacher_prompt, add_special_tokens=False).input_ids
        assert episode.approach == context.approach and episode.baseline_answer == context.baseline_answer
        assert episode.teaching == extract_teaching(rollout.completion_text)[0]
        assert item.prompt == context.teacher_prompt and item.ground_truth == context.ground_truth
    # the answers with teaching were asked with each sample's own teaching
    assert answer_call == [encode(tiny_tokenizer, fill_template(
        args.student_with_teaching_template, question=i.teaching.question, teaching=i.teaching.teaching))
        for i in batch.inputs]

    # the training path's logprobs are those of a direct forward over exactly prompt + completion
    train_batch = rollout_batch(batch.rollouts, tiny_tokenizer.pad_token_id, mask_truncated=False)
    with torch.no_grad():
        logps = completion_logprobs(policy, train_batch, temperature=1.0)                     # [B, C]
        for row, rollout in enumerate(batch.rollouts):
            ids = rollout.prompt_ids + rollout.completion_ids
            logits = policy(torch.tensor([ids])).logits[0]                                        # [L, V]
            p = len(rollout.prompt_ids)
            direct = torch.log_softmax(logits[p - 1:-1], -1).gather(1, torch.tensor(rollout.completion_ids)[:, None])
            assert torch.allclose(logps[row, :len(rollout.completion_ids)], direct[:, 0], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Rewards
# ---------------------------------------------------------------------------------------------
class Cfg:
    teaching_partial_credit = 0.5
    teaching_degradation_penalty = -0.5
    teaching_efficiency_bonus = 0.0
    teaching_answer_checker = "arithmetic"
    teaching_leak_cap = 0.3
    max_completion_length = 100


def item(answer, baseline, teaching="line the digits up", truth="46", tokens=10, approach="add"):
    return RewardInput(prompt="p", completion=f"<teaching>{teaching}</teaching>", ground_truth=truth,
                       teaching=TeachingTrajectory(question="12+34=", approach=approach, teaching=teaching,
                                                   teacher_text=f"<teaching>{teaching}</teaching>", answer=answer,
                                                   baseline_answer=baseline, teaching_tokens=tokens))


def test_teaching_improvement_cases_bonus_penalty_and_leak():
    from common.teaching_rewards import TeachingImprovementReward

    reward = TeachingImprovementReward(Cfg())
    cases = [item("46", "45"), item("46", "46"), item("45", "46"), item("44", "45")]
    assert reward(cases) == [1.0, 0.5, -0.5, 0.0]
    cfg = Cfg()
    cfg.teaching_efficiency_bonus = 0.2
    bonus = TeachingImprovementReward(cfg)
    assert bonus([item("46", "45", tokens=25), item("46", "46", tokens=25), item("46", "45", tokens=150)]) == \
        pytest.approx([1.15, 0.65, 1.0])
    # a teaching that states the sum is capped; a failed student call or no ground truth is None, never 0
    leaked = [item("46", "45", teaching="the answer is 46"), item("46", "45", teaching="so 12+34=46.")]
    assert reward(leaked) == [0.3, 0.3]
    assert reward.pop_metrics()["rewards/teaching_improvement/capped"] == 2
    assert reward([item(None, "45"), item("46", None), item("46", "45", approach=None), item("46", "45", truth=None)]) \
        == [None, None, None, None]


def test_rlt_matches_a_hand_computation(tiny_model_dir, tiny_tokenizer):
    import torch

    from common.teaching_rewards import RLTReward

    student, teacher = tiny(tiny_model_dir), tiny(tiny_model_dir, seed=2)

    class RltCfg:
        rlt_temperature = 0.7
        rlt_answer_log_prob_coeff = [1.0, 0.01]
        rlt_kl_penalty_coeff = [3.0, 0.03]
        rlt_solution_column = "solution"
        teaching_leak_cap = 0.3
        trainer_args = TeacherArgs(student_with_teaching_template="Q {question} T {teaching} go")

    reward = RLTReward(RltCfg())
    reward.attach(lambda ids: student(torch.tensor([ids])).logits[0], lambda ids: teacher(torch.tensor([ids])).logits[0],
                  tiny_tokenizer)
    teacher_prompt = user_prompt_text(tiny_tokenizer, "teach 12+34=")
    sample = item("46", "45", teaching="carry one")
    sample.prompt, sample.teaching.teacher_text = teacher_prompt, "<t>x</t><teaching> carry one</teaching>"
    sample.metadata = {"solution": "2+4 is 6, 1+3 is 4: 46"}
    value = reward([sample])[0]

    # by hand: one forward per predicted token, over the texts as the student and the teacher read them
    tau, encode = 0.7, (lambda text: tiny_tokenizer(text, add_special_tokens=False).input_ids)

    def next_logprobs(model, ids):
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1] / tau, -1)

    student_text = user_prompt_text(tiny_tokenizer, "Q 12+34= T carry one go")
    student_prefix = encode(student_text)
    solution = encode("2+4 is 6, 1+3 is 4: 46")
    solution_logps = torch.stack([next_logprobs(student, student_prefix + solution[:k])[token]
                                  for k, token in enumerate(solution)])
    teaching = encode("carry one")
    student_before = encode(student_text[:student_text.index("carry one")])
    teacher_before = encode(teacher_prompt) + encode("<t>x</t><teaching> ")
    kls = []
    for k in range(len(teaching)):
        t = next_logprobs(teacher, teacher_before + teaching[:k])
        s = next_logprobs(student, student_before + teaching[:k])
        kls.append((t.exp() * (t - s)).sum())
    kls = torch.stack(kls)
    expected = (solution_logps.mean() + 0.01 * solution_logps.min()) - (3.0 * kls.mean() + 0.03 * kls.max())
    assert value == pytest.approx(expected.item(), rel=1e-4, abs=1e-4)
    metrics = reward.pop_metrics()
    assert metrics["rewards/rlt/kl_term"] > 0
    # an empty teaching has no KL term (and still runs both forwards)
    empty = item("46", "45", teaching="")
    empty.prompt, empty.teaching.teacher_text, empty.metadata = teacher_prompt, "<teaching></teaching>", sample.metadata
    solution_term, kl_term = reward.terms(empty)
    assert kl_term == 0.0 and solution_term < 0
    # a leaked teaching is capped like every other reward
    sample.teaching.teaching, sample.teaching.leaked = "the answer is 46", None
    sample.teaching.teacher_text = "<teaching>the answer is 46</teaching>"
    assert reward([sample])[0] <= 0.3


def test_rim_judges_see_the_whole_trajectory():
    from openai_stub_server import OpenAIStubServer, StubReply, verdict

    from common.judges import RIMReward, load_reward_system

    with OpenAIStubServer(reply=lambda r: StubReply(content=verdict(0.8))) as server:
        config = load_reward_system(ROOT / "configs/reward_system/interpretation.yaml", [
            f"models.api_base={server.base_url}", "models.small_model=openai/small", "models.large_model=openai/large",
            "retry_backoff=0.01", "timeout=5", "cache=false", "temperatures=[0.2]"])
        rim = RIMReward(config)
        sample = item("12+34 is 46", "12+34 is 45", teaching="Add the units first, then carry.")
        sample.teaching.approach = "I will add the tens, then the units."
        assert rim([sample]) == [pytest.approx(0.8)]
        texts = {re.search(r"You are the (\w+) judge", r.text).group(1): r.text for r in server.requests}
    assert set(texts) == {"ACCURACY", "HELPFULNESS", "PROCESS", "DIAGNOSTIC"}
    helpfulness = texts["HELPFULNESS"]
    for value in ("12+34=", "I will add the tens, then the units.", "Add the units first, then carry.",
                  "12+34 is 45", "12+34 is 46", "46"):
        assert value in helpfulness, value
    assert "Student's answer before the guidance:\n<<<BEGIN baseline_answer" in helpfulness
    assert "Add the units first, then carry." in texts["DIAGNOSTIC"] and "I will add the tens" in texts["DIAGNOSTIC"]
    assert "12+34 is 46" in texts["ACCURACY"]


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------
TEACHER_RUN = """\
# launch: train_grpo.py
defaults:
  - model: tiny
  - data: arithmetic_rl
  - trainer: teacher_grpo
use_vllm: false
reward_funcs: [teaching_improvement]
teaching_answer_checker: arithmetic
max_probe_tokens: 6
trainer_args:
  student_max_new_tokens: 4
make_dataset_fn:
  num_samples: 120
train_batch_size: 16
per_device_train_batch_size: 8
num_generations: 4
max_completion_length: 6
bf16: false
gradient_checkpointing: false
learning_rate: 1.0e-3
beta: 0.04
logging_prob: 0.5
eval_max_samples: 4
"""


def teacher_args(config: Path, model_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train_grpo.py", "--config", str(config), f"model_name_or_path={model_dir}", f"output_dir={out}", *extra]


@pytest.fixture
def teacher_config(tmp_path) -> Path:
    path = tmp_path / "teacher.yaml"
    path.write_text(TEACHER_RUN)
    return path


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]


TEACHER_KEYS = ("teacher/student_accuracy", "teacher/baseline_accuracy", "teacher/accuracy_delta",
                "teacher/improvement_rate", "teacher/degradation_rate", "teacher/answer_leak_rate",
                "teacher/teaching_tokens", "teacher/missing_teaching_tag_rate", "time/baseline", "time/diagnostic",
                "time/teacher", "time/student", "time/reward", "time/update")


STRAIGHT = ["max_steps=2", "save_steps=1", "save_total_limit=3", "eval_on_start=true"]


def api_student_reply():
    """The API student's stub replies: every first attempt of a prompt fails once (retried); with teaching it answers
    odd-`a` prompts never (unscored) and the rest right; alone it is right on even `b` only."""
    lock, seen = threading.Lock(), {}

    def reply(request):
        text = request.text
        a, b = map(int, re.search(r"(\d+)\+(\d+)=", text).groups())
        with lock:   # every first attempt of a prompt fails once: retried
            seen[text] = seen.get(text, 0) + 1
            first = seen[text] == 1
        if first and "Before solving" not in text:
            return StubReply(status=500)
        if "A teacher has provided" in text and a % 2:   # these never succeed: the sample stays unscored
            return StubReply(status=503)
        if "A teacher has provided" in text:
            return StubReply(content=str(a + b))
        return StubReply(content=str(a + b - 1) if b % 2 else str(a + b))   # alone: right on even b only
    return reply


@pytest.fixture(scope="module")
def teacher_runs(tiny_model_dir, tmp_path_factory) -> dict:
    """Three teacher runs side by side: "straight" (1 process, checkpoints every step), "two" (2 processes) and
    "api" (an API student behind a stub server). name -> (output_dir, result); the tests below read them."""
    root = tmp_path_factory.mktemp("teacher_runs")
    config = root / "teacher.yaml"
    config.write_text(TEACHER_RUN)
    with OpenAIStubServer(reply=api_student_reply()) as server:
        results = side_by_side(
            lambda: run_python(teacher_args(config, tiny_model_dir, root / "straight", *STRAIGHT), env=ONE_THREAD),
            lambda: accelerate_launch(teacher_args(config, tiny_model_dir, root / "two", "max_steps=1", "save_steps=0",
                                                   "per_device_train_batch_size=4", "do_eval=true")),
            lambda: run_python(teacher_args(config, tiny_model_dir, root / "api", "max_steps=2", "save_steps=0",
                                            "do_eval=false", "student_model=litellm:openai/student",
                                            f"student_api_base={server.base_url}",
                                            "trainer_args.student_api.max_retries=2",
                                            "trainer_args.student_api.retry_backoff=0.01", "logging_prob=1.0"),
                               env=ONE_THREAD))
    return {name: (root / name, result) for name, result in zip(("straight", "two", "api"), results)}


def test_teacher_run_logs_checkpoints_and_resumes(teacher_runs, tiny_model_dir, teacher_config, tmp_path):
    straight, result = teacher_runs["straight"]
    assert_ok(result)
    rows = metrics(straight)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in TEACHER_KEYS:
        assert key in steps[-1], key
    evals = [r for r in rows if "eval/teacher/student_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and "eval/teacher/baseline_accuracy" in evals[0]
    assert "| teacher | student alone | student with teaching |" in result.stdout
    episodes = [json.loads(line) for line in (straight / "teacher_chats/episodes.jsonl").read_text().splitlines()]
    assert episodes and {"question", "approach", "teacher_prompt", "teaching", "answer_with_teaching",
                         "baseline_answer", "reward", "advantage", "rewards"} <= set(episodes[0])
    assert all(e["approach"] in e["teacher_prompt"] for e in episodes)
    assert (straight / "checkpoint-2" / "trainer_state.json").is_file()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-1", resumed / "checkpoint-1")
    assert_ok(run_python(teacher_args(teacher_config, tiny_model_dir, resumed, *STRAIGHT, "eval_on_start=false",
                                      "resume_from_checkpoint=latest"), env=ONE_THREAD))
    again = [r for r in metrics(resumed) if "loss" in r]
    assert [r["step"] for r in again] == [2]
    before = {r["step"]: r for r in steps}
    for key in ("reward", "loss", "kl", "teacher/teaching_tokens"):
        assert again[0][key] == pytest.approx(before[2][key], abs=1e-6), key


def test_teacher_run_on_two_processes(teacher_runs):
    out, result = teacher_runs["two"]
    assert_ok(result)
    rows = metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1]
    assert any("eval/teacher/student_accuracy" in r for r in rows)


def test_api_student_through_the_stub_server_is_retried_and_a_failed_call_never_scores(teacher_runs):
    out, result = teacher_runs["api"]
    assert_ok(result)
    steps = [r for r in metrics(out) if "loss" in r]
    assert len(steps) == 2
    assert sum(r["student/retries"] for r in steps) > 0 and sum(r["student/failures"] for r in steps) > 0
    assert all(r["student/failures"] == pytest.approx(16 * r["teacher/student_failure_rate"]) for r in steps)
    episodes = [json.loads(line) for line in (out / "teacher_chats/episodes.jsonl").read_text().splitlines()]
    failed = [e for e in episodes if e["answer_with_teaching"] is None]
    scored = [e for e in episodes if e["answer_with_teaching"] is not None]
    assert failed and scored
    assert all(e["reward"] is None and e["rewards"]["teaching_improvement"] is None for e in failed)
    # the API student answers right with any teaching: 1 where it was wrong alone, the partial credit otherwise
    assert all(e["reward"] == (0.5 if e["correct_alone"] else 1.0) for e in scored)


# ---------------------------------------------------------------------------------------------
# Bad input: one clear error before any model loads
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,message", [
    (["trainer_args.teacher_adaptive_template=Q {question} {answer}"], r"unknown placeholder\(s\) \{answer\}"),
    (["trainer_args.student_diagnostic_template=plan"], r"student_diagnostic_template' has no \{question\}"),
    (["student_model=./no/such/student"], r"key 'student_model' = './no/such/student': no such directory"),
    (["reward_funcs=[rlt]", "student_model=litellm:openai/gpt-4o-mini"], r"reward 'rlt' needs the student's logprobs"),
    (["trainer_args.max_probe_tokens=9"], "one budget"),
    (["sync_ref_model=true"], "would update the student"),
])
def test_bad_teacher_config_is_one_error(tiny_model_dir, teacher_config, tmp_path, extra, message):
    from train_grpo import Config

    with pytest.raises(ConfigError, match=message):
        load_config(Config, ["--config", str(teacher_config), f"model_name_or_path={tiny_model_dir}",
                             f"output_dir={tmp_path / 'never'}", *extra])


def test_teacher_rewards_need_the_teacher_preset(tiny_model_dir, tmp_path):
    from train_grpo import Config

    with pytest.raises(ConfigError, match=r"score teacher episodes: use the teacher preset"):
        load_config(Config, ["--config", "configs/recipe/quickstart_grpo.yaml", f"model_name_or_path={tiny_model_dir}",
                             "reward_funcs=[teaching_improvement]"])


@pytest.mark.parametrize("case", ["student_does_not_load", "rlt_without_solutions", "no_ground_truth",
                                  "rlt_other_tokenizer"])
def test_bad_teacher_data_or_student_fails_before_models_load(tiny_model_dir, teacher_config, tmp_path, capsys, case):
    import train_grpo

    out = tmp_path / "never"
    extra = {"student_does_not_load": [f"student_model={tmp_path}"],
             "rlt_without_solutions": ["reward_funcs=[rlt]"],
             "no_ground_truth": [f"dataset_id_or_path={tmp_path / 'rows.jsonl'}"],
             "rlt_other_tokenizer": ["reward_funcs=[rlt]", f"student_model={tmp_path / 'other'}",
                                     f"dataset_id_or_path={tmp_path / 'solved.jsonl'}"]}[case]
    if case in ("no_ground_truth", "rlt_other_tokenizer"):   # rows from a file instead of the arithmetic generator
        teacher_config.write_text(TEACHER_RUN.replace("  - data: arithmetic_rl\n", "").replace(
            "make_dataset_fn:\n  num_samples: 120\n", ""))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"prompt": f"{i}+1="}) + "\n" for i in range(40)))
    (tmp_path / "solved.jsonl").write_text("".join(
        json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1), "solution": f"{i} and 1 make {i + 1}"}) + "\n"
        for i in range(40)))
    if case == "rlt_other_tokenizer":
        from make_tiny_model import build_tiny_tokenizer
        tokenizer = build_tiny_tokenizer()
        tokenizer.add_tokens(["<extra>"])
        tokenizer.save_pretrained(tmp_path / "other")
        shutil.copy(tiny_model_dir / "config.json", tmp_path / "other" / "config.json")
    with pytest.raises(SystemExit) as exit_info:
        train_grpo.main(["--config", str(teacher_config), f"model_name_or_path={tiny_model_dir}",
                         f"output_dir={out}", *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    expected = {"student_does_not_load": r"key 'student_model' = '.*' does not load",
                "rlt_without_solutions": r"reward 'rlt' needs a reference solution in column 'solution'",
                "no_ground_truth": r"reward 'teaching_improvement' compares .* no training row has one",
                "rlt_other_tokenizer": r"the student's tokenizer must be the teacher's"}[case]
    assert re.search(expected, err), err
    assert not out.exists()


def test_teacher_rcl_resolves_to_the_spec_and_a_run_without_its_servers_stops_before_models(
        tmp_path, capsys, monkeypatch):
    import train_grpo

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--config", "configs/recipe/teacher_rcl.yaml", "vllm_host=127.0.0.1", "vllm_port=1"]
    cfg = load_config(train_grpo.Config, argv)
    assert (cfg.model_name_or_path, cfg.dataset_id_or_path, cfg.train_batch_size, cfg.num_generations) == \
        ("Qwen/Qwen3-8B", "Arc-Intelligence/Arc-ATLAS-Teach-v0", 128, 8)
    assert cfg.use_vllm_server and cfg.trainer_log_name == "teacher_grpo_rw_interpretation_teaching"
    assert (cfg.logging_prob, cfg.student_model, cfg.use_reference_teacher_model, cfg.completion_only_training) == \
        (0.1, None, False, False)
    assert cfg.trainer_args.max_probe_tokens == cfg.max_probe_tokens == 500
    assert cfg.teacher_reward["_target_"] == "common.judges.RIMReward" and cfg.reward_log_name == "interpretation_teaching"
    for name, text in DEFAULT_TEMPLATES.items():
        assert getattr(cfg.trainer_args, name) == text
    with pytest.raises(SystemExit) as printed:
        load_config(train_grpo.Config, [*argv, "--print-config"])
    assert printed.value.code == 0 and "max_probe_tokens: 500" in capsys.readouterr().out
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as stopped:
        train_grpo.main([*argv, f"output_dir={out}"])
    assert stopped.value.code == 2 and "vLLM server at 127.0.0.1:1 is down" in capsys.readouterr().err
    assert not out.exists()
