"""Teacher GRPO: the student -> teacher -> student episode that turns a GRPO rollout into a teaching rollout.

Per prompt of a step (shared by the G teacher samples of its group, so the group compares teachings of one
situation):
  1. baseline   the student answers the question alone (`student_baseline_template`);
  2. diagnostic the student describes its approach (`student_diagnostic_template`, <= `max_probe_tokens` tokens);
Per teacher sample:
  3. teacher    the policy writes from `teacher_adaptive_template(question, approach)`: this filled prompt is the
                rollout's prompt, so the policy's logprobs, old logprobs and KL are taken on exactly it;
                the teaching is the text inside the first `<teaching>...</teaching>` (no tag: the whole completion);
  4. student    the student answers from `student_with_teaching_template(question, teaching)`.
The rewards read the whole episode (`RewardInput.teaching`, a `TeachingTrajectory`).

Each filled template is one user message through the receiving model's chat template: the teacher prompt with
the policy's tokenizer, the student prompts with the student's. Texts pass between them, never token ids, so the
student may use another tokenizer (only `rlt` needs the same one). The student is frozen: the initial policy
weights (`student_model: null`), another local or hub model, or an API model (`litellm:<provider/model>`).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, Sequence

from common.rewards import RewardInput, TeachingTrajectory

logger = logging.getLogger(__name__)

API_STUDENT_PREFIX = "litellm:"

# The spec's templates (trainer/teacher_grpo.yaml), verbatim; the baseline one is ours, in the same style.
DEFAULT_TEMPLATES = {
    "student_baseline_template": (
        "Question: {question}\n"
        "\n"
        "Now solve step by step.\n"
        "<solution></solution>\n"),
    "student_diagnostic_template": (
        "Question: {question}\n"
        "Before solving, briefly describe:\n"
        "1. What type of problem this is\n"
        "2. The key concepts or steps needed\n"
        "3. Any potential challenges you see\n"),
    "teacher_adaptive_template": (
        "Question: {question}\n"
        "Student's approach: {approach}\n"
        "\n"
        "<thinking>\n"
        "[Analyze student approach]\n"
        "</thinking>\n"
        "\n"
        "<teaching>\n"
        "[Only guidance to student - no answers]\n"
        "</teaching>\n"),
    "student_with_teaching_template": (
        "Question: {question}\n"
        "A teacher has provided: {teaching}\n"
        "\n"
        "Now solve step by step.\n"
        "<solution></solution>\n"),
}
TEMPLATE_PLACEHOLDERS = {
    "student_baseline_template": ("question",),
    "student_diagnostic_template": ("question",),
    "teacher_adaptive_template": ("question", "approach"),
    "student_with_teaching_template": ("question", "teaching"),
}
# `{name}` with a bare identifier is a placeholder; any other brace (JSON, LaTeX, `{ }`) is text.
_PLACEHOLDER = re.compile(r"\{([A-Za-z_]\w*)\}")
_TEACHING_TAG = re.compile(r"<teaching>(.*?)</teaching>", re.DOTALL | re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------------------------
# Config (train_grpo.py `trainer_args`)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class StudentAPIArgs:
    """An API student's calls (`student_model: litellm:...`): the judges' retry, concurrency and cache rules."""
    max_workers: int = 8                  # calls in flight
    timeout: float = 60.0                 # seconds per request
    max_retries: int = 3                  # retries per call, exponential backoff
    retry_backoff: float = 1.0            # seconds before the first retry; doubles each retry
    cache: bool = True                    # greedy replies (student_temperature 0) in output_dir/student_cache.sqlite


@dataclass
class TeacherArgs:
    max_probe_tokens: int = 500                       # the diagnostic's max new tokens
    student_baseline_template: str = DEFAULT_TEMPLATES["student_baseline_template"]
    student_diagnostic_template: str = DEFAULT_TEMPLATES["student_diagnostic_template"]
    teacher_adaptive_template: str = DEFAULT_TEMPLATES["teacher_adaptive_template"]
    student_with_teaching_template: str = DEFAULT_TEMPLATES["student_with_teaching_template"]
    student_max_new_tokens: int = 1024                # the baseline answer's and the answer with teaching's budget
    student_temperature: float = 0.0                  # 0 = greedy
    student_api: StudentAPIArgs = field(default_factory=StudentAPIArgs)


def check_teacher_args(args: TeacherArgs) -> None:
    """Start-up checks (ConfigError): every template's placeholders, the budgets."""
    from common.config import ConfigError

    for name, allowed in TEMPLATE_PLACEHOLDERS.items():
        text = getattr(args, name)
        unknown = sorted(set(_PLACEHOLDER.findall(text)) - set(allowed))
        if unknown:
            raise ConfigError(f"key 'trainer_args.{name}' names unknown placeholder(s) "
                              f"{', '.join('{' + u + '}' for u in unknown)}; allowed: "
                              f"{', '.join('{' + a + '}' for a in allowed)} (other braces are kept as text)")
        if "{question}" not in text:
            raise ConfigError(f"key 'trainer_args.{name}' has no {{question}} placeholder: the student or teacher "
                              f"would never see the question")
    for key in ("max_probe_tokens", "student_max_new_tokens"):
        if getattr(args, key) < 1:
            raise ConfigError(f"key 'trainer_args.{key}' = {getattr(args, key)}: expected an integer >= 1")
    if args.student_temperature < 0:
        raise ConfigError(f"key 'trainer_args.student_temperature' = {args.student_temperature}: expected >= 0")
    api = args.student_api
    if api.max_workers < 1 or api.timeout <= 0 or api.max_retries < 0 or api.retry_backoff < 0:
        raise ConfigError(f"key 'trainer_args.student_api' = {dataclasses.asdict(api)}: expected max_workers >= 1, "
                          f"timeout > 0, max_retries >= 0, retry_backoff >= 0")


def fill_template(template: str, **values: str) -> str:
    """One pass over `{name}` placeholders, known names only: other braces stay, inserted text is never expanded."""
    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in values:
            raise KeyError(f"template placeholder {{{name}}} has no value; known: {sorted(values)}")
        return str(values[name])
    return _PLACEHOLDER.sub(substitute, template)


def question_text(example) -> str:
    """The dataset row's prompt text, raw: the last user message (the whole prompt when there is none)."""
    users = [str(m.get("content", "")) for m in example.prompt if m.get("role") == "user"]
    if users:
        return users[-1]
    return "\n".join(str(m.get("content", "")) for m in example.prompt)


def extract_teaching(text: str) -> tuple[str, bool]:
    """(teaching, tag found): the first `<teaching>` block's content, stripped; no tag -> the whole text."""
    match = _TEACHING_TAG.search(text)
    if match:
        return match.group(1).strip(), True
    return text.strip(), False


def user_prompt_text(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def is_api_student(student_model: Optional[str]) -> bool:
    return bool(student_model) and student_model.startswith(API_STUDENT_PREFIX)


# ---------------------------------------------------------------------------------------------------------------------
# Students
# ---------------------------------------------------------------------------------------------------------------------
class Student(Protocol):
    def complete(self, contents: list[str], max_new_tokens: int, temperature: float,
                 seed: Optional[int] = None) -> list[Optional[str]]:
        """One answer per user message; None where the student could not answer (an API call that failed)."""
        ...

    def pop_metrics(self) -> dict[str, float]:
        ...


class EngineStudent:
    """A local frozen model behind the rollout interface (`common.rollout`): its own engine, never synced."""

    def __init__(self, engine, tokenizer, adapter_off: Optional[Callable] = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.adapter_off = adapter_off   # PEFT, student = the adapter-free base: a context manager factory

    def complete(self, contents: list[str], max_new_tokens: int, temperature: float,
                 seed: Optional[int] = None) -> list[Optional[str]]:
        import contextlib

        from common.rollout import SamplingParams

        ids = [self.tokenizer(user_prompt_text(self.tokenizer, c), add_special_tokens=False).input_ids
               for c in contents]
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new_tokens, num_generations=1, seed=seed)
        with self.adapter_off() if self.adapter_off else contextlib.nullcontext():
            rollouts = self.engine.generate(ids, params)
        return [r.completion_text for r in rollouts]

    def pop_metrics(self) -> dict[str, float]:
        return {}


@dataclass
class _APIWindow:
    calls: int = 0
    requests: int = 0
    failures: int = 0
    cache_hits: int = 0
    cost_usd: float = 0.0
    last_error: str = ""


class APIStudent:
    """An API model through litellm (`student_model: litellm:<provider/model>`), with the judges' machinery:
    concurrent calls on the judges' event loop, retries with backoff, a reply cache, cost. A call that fails after
    its last retry gives None (never a wrong answer) and is counted."""

    def __init__(self, model: str, api: StudentAPIArgs, api_base: Optional[str] = None,
                 api_key_env: Optional[str] = None, cache_path: Optional[str] = None):
        self.model = model
        self.api = api
        self.api_base = api_base
        self.api_key_env = api_key_env
        if api_key_env and not os.environ.get(api_key_env):
            raise ValueError(f"key 'student_api_key_env' names {api_key_env!r}, which is not set in the environment")
        self.cache = None
        if api.cache and cache_path:
            from common.judges import ReplyCache
            self.cache = ReplyCache(cache_path)
        self._window = _APIWindow()
        self._semaphore: Optional[asyncio.Semaphore] = None

    def complete(self, contents: list[str], max_new_tokens: int, temperature: float,
                 seed: Optional[int] = None) -> list[Optional[str]]:
        from common.judges import _judge_loop

        if not contents:
            return []
        new_replies: list = []
        replies = _judge_loop().run(self._batch(contents, max_new_tokens, temperature, new_replies))
        if self.cache is not None:
            self.cache.put_many(new_replies)   # one commit per batch, from this thread
        return replies

    def pop_metrics(self) -> dict[str, float]:
        window, self._window = self._window, _APIWindow()
        if window.failures:
            logger.warning("student: %d of %d calls failed after retries; last error: %s", window.failures,
                           window.calls, window.last_error)
        return {"student/calls": float(window.calls), "student/requests": float(window.requests),
                "student/retries": float(window.requests - window.calls), "student/failures": float(window.failures),
                "student/cache_hits": float(window.cache_hits), "student/cost_usd": window.cost_usd}

    async def _batch(self, contents, max_new_tokens, temperature, new_replies) -> list[Optional[str]]:
        if self._semaphore is None:   # created on the loop that uses it
            self._semaphore = asyncio.Semaphore(self.api.max_workers)
        return list(await asyncio.gather(*[self._call(c, max_new_tokens, temperature, new_replies)
                                           for c in contents]))

    async def _call(self, content: str, max_new_tokens: int, temperature: float, new_replies) -> Optional[str]:
        import openai

        from common.judge_client import JudgeCallError, complete
        from common.judges import ReplyCache

        messages = [{"role": "user", "content": content}]
        # only greedy replies are cached: a sampled answer must stay a fresh sample
        use_cache = self.cache is not None and temperature == 0
        key = ReplyCache.key(f"{self.model}|max_tokens={max_new_tokens}", temperature, messages) if use_cache else None
        if use_cache:
            cached = self.cache.get(key)
            if cached is not None:
                self._window.cache_hits += 1
                return cached
        self._window.calls += 1
        request = dict(model=self.model, messages=messages, temperature=temperature, max_tokens=max_new_tokens,
                       **self._credentials())
        for attempt in range(self.api.max_retries + 1):
            if attempt:
                await asyncio.sleep(self.api.retry_backoff * 2 ** (attempt - 1) * (0.5 + random.random()))
            async with self._semaphore:
                self._window.requests += 1
                try:
                    reply, cost = await complete(request, self.api.timeout)
                except (JudgeCallError, asyncio.TimeoutError, openai.OpenAIError) as err:
                    self._window.last_error = f"{self.model}: {type(err).__name__}: {str(err)[:200]}"
                    continue
            if cost is not None:
                self._window.cost_usd += cost
            if use_cache:
                new_replies.append((key, self.model, temperature, reply))
            return reply
        self._window.failures += 1
        return None

    def _credentials(self) -> dict:
        out = {}
        if self.api_base:
            out["api_base"] = self.api_base
            if self.model.startswith(("openai/", "hosted_vllm/")):
                out["api_key"] = "EMPTY"   # local servers want some key; never send OPENAI_API_KEY there
        if self.api_key_env:
            out["api_key"] = os.environ[self.api_key_env]
        return out


# ---------------------------------------------------------------------------------------------------------------------
# Episodes
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class PromptContext:
    """What the G teacher samples of one prompt share."""
    question: str
    ground_truth: Optional[str]
    baseline_answer: Optional[str]      # None: the student call failed
    approach: Optional[str]             # None: the student call failed
    teacher_prompt: str                 # the filled teacher template through the policy's chat template
    baseline_correct: Optional[bool]    # None: no ground truth or no answer


@dataclass
class EpisodeBatch:
    contexts: list[PromptContext]       # one per prompt
    rollouts: list                      # the policy's rollouts, prompt-major (G per prompt)
    inputs: list[RewardInput]           # one per rollout, `.teaching` set
    answer_correct: list[Optional[bool]]
    timings: dict[str, float]
    student_generations: int = 0        # student answers generated this batch (baseline + diagnostic + with teaching)


def answer_checker(name: str, cfg) -> Callable[[Optional[str], Optional[str]], Optional[bool]]:
    """`teaching_answer_checker`: the registered answer function that decides whether an answer is right."""
    from common.rewards import get_reward_factory

    function = get_reward_factory(name)(cfg)

    def correct(answer: Optional[str], ground_truth: Optional[str]) -> Optional[bool]:
        if answer is None or ground_truth is None:
            return None
        value = function([RewardInput(prompt="", completion=answer, ground_truth=ground_truth)])[0]
        return None if value is None else value >= 1.0
    return correct


class TeachingLoop:
    """Builds the episodes of a step (and of the held-out eval) from a student and the policy's rollout engine."""

    def __init__(self, args: TeacherArgs, student: Student, teacher_engine, teacher_tokenizer,
                 correct: Callable[[Optional[str], Optional[str]], Optional[bool]],
                 max_prompt_length: Optional[int] = None, prompt_overflow: str = "truncate", seed: int = 0):
        self.args = args
        self.student = student
        self.engine = teacher_engine
        self.tokenizer = teacher_tokenizer
        self.correct = correct
        self.max_prompt_length = max_prompt_length
        self.prompt_overflow = prompt_overflow
        self.seed = seed

    def run(self, examples: list, sampling, step: int = 0, student_temperature: Optional[float] = None) -> EpisodeBatch:
        """Episodes for `examples` (this process's prompts): `sampling.num_generations` teacher samples each."""
        from common.rewards import answer_leaked
        from common.rollout import truncate_prompts

        args = self.args
        temperature = args.student_temperature if student_temperature is None else student_temperature
        seed = None if temperature == 0 else self.seed * 1_000_003 + step
        timings = {}
        questions = [question_text(e) for e in examples]

        start = time.time()
        baselines = self.student.complete([fill_template(args.student_baseline_template, question=q)
                                           for q in questions], args.student_max_new_tokens, temperature, seed)
        timings["time/baseline"] = time.time() - start
        start = time.time()
        approaches = self.student.complete([fill_template(args.student_diagnostic_template, question=q)
                                            for q in questions], args.max_probe_tokens, temperature, seed)
        timings["time/diagnostic"] = time.time() - start

        contexts = []
        for example, question, baseline, approach in zip(examples, questions, baselines, approaches):
            # a failed diagnostic still gets a teacher prompt (every process generates in step); its group scores None
            content = fill_template(args.teacher_adaptive_template, question=question, approach=approach or "")
            contexts.append(PromptContext(
                question=question, ground_truth=example.ground_truth, baseline_answer=baseline, approach=approach,
                teacher_prompt=user_prompt_text(self.tokenizer, content),
                baseline_correct=self.correct(baseline, example.ground_truth)))

        start = time.time()
        prompt_ids, _ = truncate_prompts([self.tokenizer(c.teacher_prompt, add_special_tokens=False).input_ids
                                          for c in contexts], self.max_prompt_length, on_overflow=self.prompt_overflow)
        rollouts = self.engine.generate(prompt_ids, sampling)
        timings["time/teacher"] = time.time() - start

        teachings = [extract_teaching(r.completion_text or "") for r in rollouts]
        start = time.time()
        answers = self.student.complete(
            [fill_template(args.student_with_teaching_template, question=contexts[r.prompt_index].question,
                           teaching=teaching) for r, (teaching, _) in zip(rollouts, teachings)],
            args.student_max_new_tokens, temperature, seed)
        timings["time/student"] = time.time() - start

        inputs, answer_correct = [], []
        for rollout, (teaching, found), answer in zip(rollouts, teachings, answers):
            context = contexts[rollout.prompt_index]
            example = examples[rollout.prompt_index]
            trajectory = TeachingTrajectory(
                question=context.question, approach=context.approach, teaching=teaching,
                teacher_text=rollout.completion_text or "", answer=answer, baseline_answer=context.baseline_answer,
                teaching_tokens=len(self.tokenizer(teaching, add_special_tokens=False).input_ids),
                missing_teaching_tag=not found,
                leaked=bool(context.ground_truth) and answer_leaked(teaching, context.ground_truth))
            inputs.append(RewardInput(prompt=context.teacher_prompt, completion=trajectory.teacher_text,
                                      ground_truth=context.ground_truth,
                                      messages=[{"role": "user", "content": context.teacher_prompt}],
                                      metadata=example.metadata, teaching=trajectory))
            answer_correct.append(self.correct(answer, context.ground_truth))
        return EpisodeBatch(contexts=contexts, rollouts=rollouts, inputs=inputs, answer_correct=answer_correct,
                            timings=timings, student_generations=2 * len(examples) + len(rollouts))

    def evaluate(self, accelerator, examples: list, max_new_tokens: int, batch_size: int = 64) -> dict:
        """Greedy teacher, greedy student on `examples` (sharded over processes; all must call it together)."""
        from accelerate.utils import gather_object

        from common.rollout import SamplingParams

        local = examples[accelerator.process_index::accelerator.num_processes]
        rows = []
        # the same number of rounds on every process (ZeRO-3 gathers the weights for each generate call)
        rounds = max(1, math.ceil(math.ceil(len(examples) / accelerator.num_processes) / batch_size))
        for start in range(0, rounds * batch_size, batch_size):
            chunk = local[start:start + batch_size]
            batch = self.run(chunk, SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens),
                             student_temperature=0.0)
            rows += [{"with": c, "without": batch.contexts[r.prompt_index].baseline_correct}
                     for r, c in zip(batch.rollouts, batch.answer_correct)]
        rows = gather_object(rows)
        both = [r for r in rows if r["with"] is not None and r["without"] is not None]
        n = len(both)
        return {"student_accuracy": sum(r["with"] for r in both) / n if n else math.nan,
                "baseline_accuracy": sum(r["without"] for r in both) / n if n else math.nan,
                "num_scored": n, "num_samples": len(rows)}


def episode_stats(batch: EpisodeBatch) -> list[list[float]]:
    """Per rollout: [correct with teaching, correct alone, leaked, teaching tokens, missing tag, student failed]
    (NaN for unknown), to gather across processes and reduce with `episode_metrics`."""
    nan = math.nan
    rows = []
    for rollout, item, correct in zip(batch.rollouts, batch.inputs, batch.answer_correct):
        episode = item.teaching
        before = batch.contexts[rollout.prompt_index].baseline_correct
        rows.append([nan if correct is None else float(correct), nan if before is None else float(before),
                     float(bool(episode.leaked)), float(episode.teaching_tokens), float(episode.missing_teaching_tag),
                     float(episode.student_failed)])
    return rows


def episode_metrics(stats) -> dict[str, float]:
    """[N, 6] tensor from `episode_stats` (all processes) -> the `teacher/*` metrics."""
    import torch

    after, before = stats[:, 0], stats[:, 1]
    known = ~torch.isnan(after) & ~torch.isnan(before)
    a, b = after[known], before[known]

    def mean(x) -> float:
        return x.float().mean().item() if x.numel() else math.nan

    return {"teacher/student_accuracy": mean(a), "teacher/baseline_accuracy": mean(b),
            "teacher/accuracy_delta": mean(a) - mean(b) if a.numel() else math.nan,
            "teacher/improvement_rate": mean((a > 0.5) & (b < 0.5)),
            "teacher/degradation_rate": mean((a < 0.5) & (b > 0.5)),
            "teacher/answer_leak_rate": mean(stats[:, 2]), "teacher/teaching_tokens": mean(stats[:, 3]),
            "teacher/missing_teaching_tag_rate": mean(stats[:, 4]),
            "teacher/student_failure_rate": mean(stats[:, 5])}


def episode_rows(batch: EpisodeBatch, rewards: Sequence[float], advantages: Sequence[float],
                 per_function: dict[str, Sequence[float]], step: int, logging_prob: float, seed: int) -> list[dict]:
    """The sampled episodes, whole, for output_dir/teacher_chats/episodes.jsonl."""
    picker = random.Random(seed * 1_000_003 + step)
    rows = []
    for i, (rollout, item) in enumerate(zip(batch.rollouts, batch.inputs)):
        if picker.random() >= logging_prob:
            continue
        episode = item.teaching

        def plain(value):
            return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

        rows.append({"step": step, "question": episode.question, "ground_truth": item.ground_truth,
                     "baseline_answer": episode.baseline_answer, "approach": episode.approach,
                     "teacher_prompt": item.prompt, "teacher_completion": episode.teacher_text,
                     "teaching": episode.teaching, "answer_with_teaching": episode.answer,
                     "correct_alone": batch.contexts[rollout.prompt_index].baseline_correct,
                     "correct_with_teaching": batch.answer_correct[i], "leaked": episode.leaked,
                     "missing_teaching_tag": episode.missing_teaching_tag,
                     "rewards": {name: plain(values[i]) for name, values in per_function.items()},
                     "reward": plain(rewards[i]), "advantage": plain(advantages[i])})
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def format_teacher_table(rows: list[tuple[str, dict]]) -> str:
    """[(label, TeachingLoop.evaluate result)] -> a Markdown table of the student's held-out accuracy."""
    lines = ["| teacher | student alone | student with teaching | samples |", "|---|---|---|---|"]
    for label, result in rows:
        lines.append(f"| {label} | {100 * result['baseline_accuracy']:.1f} % | "
                     f"{100 * result['student_accuracy']:.1f} % | {result['num_scored']} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# The run: start-up checks before any model loads, then the loop on the loaded models (train_grpo.py)
# ---------------------------------------------------------------------------------------------------------------------
def student_is_reference(cfg) -> bool:
    """`student_model: null`: the student is the initial policy weights, i.e. the frozen reference model."""
    return cfg.student_model is None


def needs_reference_model(cfg) -> bool:
    """A teacher run loads the reference even at beta 0 when the student is the initial weights, or when `rlt`
    takes the teacher side from it (`use_reference_teacher_model`)."""
    return cfg.trainer_args is not None and (
        student_is_reference(cfg) or (cfg.use_reference_teacher_model and "rlt" in cfg.reward_funcs))


@dataclass
class TeacherRun:
    """The teacher side of a GRPO run, from start-up checks (`prepare`) to the loop on live models (`connect`)."""
    cfg: object
    student_tokenizer: object = None          # None: an API student
    loop: Optional[TeachingLoop] = None
    student: Optional[Student] = None
    episodes_path: Optional[Path] = None

    @classmethod
    def prepare(cls, cfg, reward_functions: list, train_examples: list, tokenizer) -> "TeacherRun":
        """Checks that need data and tokenizers but no model (run inside fail_fast: ValueError -> `error:`)."""
        run = cls(cfg=cfg, episodes_path=Path(cfg.output_dir) / "teacher_chats" / "episodes.jsonl")
        if is_api_student(cfg.student_model):
            run.student_tokenizer = None
        elif cfg.student_model is None:
            run.student_tokenizer = tokenizer
        else:
            from transformers import AutoConfig

            from common.models import load_tokenizer
            try:
                AutoConfig.from_pretrained(cfg.student_model, trust_remote_code=cfg.trust_remote_code)
                run.student_tokenizer = load_tokenizer(cfg, cfg.student_model)
            except (OSError, ValueError) as err:
                raise ValueError(f"key 'student_model' = {cfg.student_model!r} does not load: "
                                 f"{str(err).splitlines()[0]}") from None
        if getattr(cfg, "student_engine", "hf") == "server":
            if is_api_student(cfg.student_model):
                raise ValueError("key 'student_engine' = server: the student is an API model (student_model = "
                                 f"{cfg.student_model!r}); set student_engine=hf or a local student_model")
            from common.vllm_server import check_servers_up, parse_servers
            try:
                servers = parse_servers(None, None, [cfg.student_vllm_server or ""])
            except ValueError:
                raise ValueError(f"key 'student_vllm_server' = {cfg.student_vllm_server!r}: student_engine=server "
                                 f"needs the student's vLLM server as host:port") from None
            check_servers_up(servers, "student_vllm_server")
        if getattr(cfg, "student_engine", "hf") == "ray":
            import importlib.util
            if is_api_student(cfg.student_model):
                raise ValueError("key 'student_engine' = ray: the student is an API model (student_model = "
                                 f"{cfg.student_model!r}); set student_engine=hf or a local student_model")
            if importlib.util.find_spec("ray") is None:
                raise ValueError("key 'student_engine' = ray needs Ray: `pip install ray==2.60.0` "
                                 "(requirements-dev.txt pins it); or set student_engine=hf")
        for name, function in reward_functions:
            if name in ("teaching_improvement", "rlt", "math_verify", "arithmetic", "exact_match"):
                if all(e.ground_truth is None for e in train_examples):
                    raise ValueError(f"reward {name!r} compares the student's answers with a ground truth, but no "
                                     f"training row has one (columns ground_truth / answer / solution)")
            if name == "rlt":
                function.check_examples(train_examples)
                if run.student_tokenizer is not None and run.student_tokenizer.get_vocab() != tokenizer.get_vocab():
                    raise ValueError("reward 'rlt' compares the teacher's and the student's distributions token by "
                                     "token: the student's tokenizer must be the teacher's (student_model = "
                                     f"{cfg.student_model!r} has another vocabulary)")
        return run

    def connect(self, accelerator, model, reference, student_model, engine, tokenizer, reward_functions) -> None:
        """Build the student and the loop on the loaded models; give `rlt` its forwards."""
        import contextlib

        import torch

        from common.models import eval_mode
        from common.rollout import make_engine

        cfg = self.cfg
        args = cfg.trainer_args
        adapter_off = None
        if is_api_student(cfg.student_model):
            self.student = APIStudent(cfg.student_model[len(API_STUDENT_PREFIX):], args.student_api,
                                      api_base=cfg.student_api_base, api_key_env=cfg.student_api_key_env,
                                      cache_path=str(Path(cfg.output_dir) / "student_cache.sqlite"))
        else:
            frozen = student_model if student_model is not None else reference
            if frozen is None:   # PEFT: the reference (and so the student) is the adapter-free policy
                frozen = model
                adapter_off = lambda: accelerator.unwrap_model(model).disable_adapter()  # noqa: E731
            if getattr(cfg, "student_engine", "hf") == "server":   # a vLLM server serving the student, never synced
                from common.vllm_server import parse_servers
                student_engine = make_engine("server", servers=parse_servers(None, None, [cfg.student_vllm_server]),
                                             tokenizer=self.student_tokenizer, accelerator=accelerator, sync=False,
                                             timeout_s=cfg.vllm_server_timeout, retries=cfg.vllm_server_retries)
                adapter_off = None   # the server holds the student's weights itself
            elif getattr(cfg, "student_engine", "hf") == "ray":   # vLLM in a Ray actor of its own, never synced
                from common.ray_engine import ray_options
                student_engine = make_engine("ray", **{
                    **ray_options(cfg, self.student_tokenizer, accelerator),
                    # the model the hf student would be: its own, else the reference's initial weights
                    "model_path": cfg.student_model or cfg.ref_model_name_or_path or cfg.model_name_or_path,
                    "sync": False})
                adapter_off = None   # the actor loaded the student's weights itself
            else:
                student_engine = make_engine("hf", model=frozen, tokenizer=self.student_tokenizer,
                                             accelerator=accelerator, batch_size=cfg.generation_batch_size,
                                             share_prompt_prefill=cfg.share_prompt_prefix)
            self.student = EngineStudent(student_engine, self.student_tokenizer, adapter_off)
        self.loop = TeachingLoop(args, self.student, engine, tokenizer,
                                 answer_checker(cfg.teaching_answer_checker, cfg), cfg.max_prompt_length,
                                 cfg.prompt_overflow, cfg.seed)

        def forward(net, off=None):
            def logits(ids: list[int]) -> torch.Tensor:
                inner = accelerator.unwrap_model(net) if net is model else net
                with torch.no_grad(), eval_mode(accelerator.unwrap_model(net)), \
                        (off() if off else contextlib.nullcontext()):
                    out = inner(input_ids=torch.tensor([ids], device=accelerator.device))
                return out.logits[0]
            return logits

        for name, function in reward_functions:
            if name != "rlt":
                continue
            student_side = forward(student_model) if student_model is not None else (
                forward(reference) if reference is not None else forward(model, adapter_off))
            if cfg.use_reference_teacher_model:
                teacher_side = forward(reference) if reference is not None else forward(
                    model, lambda: accelerator.unwrap_model(model).disable_adapter())
            else:
                teacher_side = forward(model)
            function.attach(student_side, teacher_side, tokenizer)

    def mask_failed(self, per_function, episodes: EpisodeBatch):
        """[N, F] rewards: NaN (None) for every sample whose student call failed -- never a wrong answer."""
        import torch

        failed = torch.tensor([item.teaching.student_failed for item in episodes.inputs], dtype=torch.bool)
        per_function = per_function.clone()
        per_function[failed] = float("nan")
        return per_function

    def step_metrics(self, accelerator, episodes: EpisodeBatch) -> dict[str, float]:
        import torch

        stats = torch.tensor(episode_stats(episodes), dtype=torch.float32).reshape(-1, 6)
        gathered = accelerator.gather(stats.to(accelerator.device)).cpu()
        metrics = episode_metrics(gathered)
        timings = torch.tensor([episodes.timings[k] for k in sorted(episodes.timings)], device=accelerator.device)
        timings = accelerator.reduce(timings, "max").cpu().tolist()   # the slowest process sets the pace
        metrics.update(dict(zip(sorted(episodes.timings), timings)))
        student = self.student.pop_metrics()   # counts of this process's calls: summed over processes
        if student:
            values = accelerator.reduce(torch.tensor([student[k] for k in sorted(student)], device=accelerator.device,
                                                     dtype=torch.float32), "sum").cpu().tolist()
            metrics.update(dict(zip(sorted(student), values)))
        return metrics

    def log_episodes(self, accelerator, episodes: EpisodeBatch, rewards, advantages, per_function: dict,
                     step: int) -> None:
        from accelerate.utils import gather_object

        rows = gather_object(episode_rows(episodes, rewards, advantages, per_function, step, self.cfg.logging_prob,
                                          self.cfg.seed + accelerator.process_index))
        if accelerator.is_main_process:
            append_jsonl(self.episodes_path, rows)
