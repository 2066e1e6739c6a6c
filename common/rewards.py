"""Reward registry: names in YAML -> batch reward functions.

A reward function takes a batch of `RewardInput` and returns one value per input: a float, or
`None` when the reward does not apply to that sample (excluded from group statistics, never 0).
Registry entries are "module:factory" strings so heavy imports (litellm) happen only when used;
a factory is called as `factory(cfg)` with the script's Config and returns the function.
A function object may expose `pop_metrics() -> dict[str, float]` for per-step logging.

Verifiable rewards defined here: "math_verify", "exact_match", "format", "arithmetic"; the teacher
rewards "teaching_improvement" and "rlt" live in common/teaching_rewards.py, "rim" in common/judges.py.
`answer_leaked(text, ground_truth)` tells whether a text states the answer (used by the judges'
anti-gaming cap); `combine_rewards` weights and sums the functions' outputs per sample.
"""
from __future__ import annotations

import importlib
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


@dataclass
class TeachingTrajectory:
    """One teacher sample's episode (teacher GRPO, common/teaching.py): what the rewards may read."""
    question: str                           # the dataset row's prompt text
    approach: Optional[str]                 # the student's diagnostic, shared by the group; None: the call failed
    teaching: str                           # extracted from the teacher's completion
    teacher_text: str                       # the teacher's whole completion
    answer: Optional[str]                   # the student's answer with the teaching; None: the call failed
    baseline_answer: Optional[str]          # the student's answer alone, shared by the group; None: failed
    teaching_tokens: int = 0                # teaching length in the teacher's tokens
    missing_teaching_tag: bool = False      # no <teaching> tag: the whole completion is the teaching
    leaked: Optional[bool] = None           # the teaching states the ground truth (None: not checked yet)

    @property
    def student_failed(self) -> bool:
        return self.approach is None or self.answer is None or self.baseline_answer is None


@dataclass
class RewardInput:
    prompt: str                     # prompt as rendered text (chat template applied)
    completion: str                 # sampled completion text
    ground_truth: Optional[str] = None
    messages: list = field(default_factory=list)   # the prompt as chat messages
    metadata: dict = field(default_factory=dict)   # extra dataset columns
    teaching: Optional[TeachingTrajectory] = None  # teacher GRPO: the whole episode of this sample


RewardFunction = Callable[[list[RewardInput]], list[Optional[float]]]

REWARD_REGISTRY: dict[str, str] = {
    "rim": "common.judges:make_rim_reward",
    "teaching_improvement": "common.teaching_rewards:make_teaching_improvement_reward",
    "rlt": "common.teaching_rewards:make_rlt_reward",
}
# Rewards that read `RewardInput.teaching`: a run asking for one must be a teacher run (trainer_args set).
TEACHING_REWARDS = ("teaching_improvement", "rlt")


def get_reward_factory(name: str):
    if name not in REWARD_REGISTRY:
        raise ValueError(
            f"unknown reward function {name!r} in `reward_funcs`; available: {', '.join(sorted(REWARD_REGISTRY))}"
        )
    module_name, attr = REWARD_REGISTRY[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


# ---------------------------------------------------------------------------------------------
# Answer extraction and normalization (shared by math_verify, exact_match and answer_leaked)
# ---------------------------------------------------------------------------------------------
# Extracted answers longer than this are compared as strings only: sympy can take unbounded time
# on long expressions, and off the main thread math-verify runs without its signal timeout.
MAX_MATH_ANSWER_CHARS = 200

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?|-?\.\d+"  # 12, -3, 1,234.5, .5
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})")
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
# "the answer is 12", "final answer: \frac12", "x = 4": the statement up to the end of the clause.
_STATED_RE = re.compile(
    r"(?:answer(?:\s+is)?|result(?:\s+is)?|solution(?:\s+is)?|equals|=)\s*[:=]?\s*"
    r"(\$[^$]{1,200}\$|[^\n,;]{1,200}?)(?=\s*(?:[.,;!?\n]\s|[.,;!?\n]?$))",
    re.IGNORECASE,
)


def extract_boxed(text: str) -> list[str]:
    """Contents of every `\\boxed{...}` / `\\fbox{...}` in order, braces balanced."""
    found = []
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found.append(text[start:i])
                break
    return found


def extract_final_answer(text: str) -> Optional[str]:
    """The completion's final answer: last `\\boxed{}`, else last `<answer>` tag, else last number."""
    boxed = extract_boxed(text)
    if boxed:
        return boxed[-1].strip()
    tags = _ANSWER_TAG_RE.findall(text)
    if tags:
        inner = extract_boxed(tags[-1])
        return (inner[-1] if inner else tags[-1]).strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def normalize_answer(text: str) -> str:
    """Lower case, `\\text{}` and `$` dropped, whitespace collapsed, trailing period removed."""
    text = re.sub(r"\\(?:text|mathrm|textbf)\{([^{}]*)\}", r"\1", text)
    text = text.replace("$", "").replace("\\!", "").replace("\\,", "")
    text = " ".join(text.lower().split())
    return text.rstrip(".").strip()


def _math_verify_timeout(seconds: Optional[int]) -> Optional[int]:
    # math-verify times out with signal.alarm, which only the main thread may set: elsewhere pass
    # None (no timeout) and rely on MAX_MATH_ANSWER_CHARS to keep sympy's work bounded.
    if threading.current_thread() is threading.main_thread():
        return seconds
    return None


def parse_math(answer: str, timeout_seconds: Optional[int] = 5) -> list:
    """math-verify parse of one extracted answer ([] when it is not mathematics or too long)."""
    from math_verify import parse

    answer = answer.strip()
    if not answer or len(answer) > MAX_MATH_ANSWER_CHARS:
        return []
    timeout = _math_verify_timeout(timeout_seconds)
    # Bare LaTeX (`\sqrt{2}`) parses only inside math delimiters; plain text ("1/2") parses either way.
    wrapped = answer if answer.startswith("$") or "\\boxed" in answer else f"${answer}$"
    return parse(wrapped, parsing_timeout=timeout) or parse(answer, parsing_timeout=timeout)


def answers_equivalent(candidate: str, ground_truth: str, timeout_seconds: Optional[int] = 5) -> bool:
    """True when `candidate` equals `ground_truth` as normalized text or, via math-verify, as mathematics."""
    if normalize_answer(candidate) == normalize_answer(ground_truth) != "":
        return True
    gold = parse_math(ground_truth, timeout_seconds)
    if not gold:
        return False
    target = parse_math(candidate, timeout_seconds)
    if not target:
        return False
    from math_verify import verify

    return verify(gold, target, timeout_seconds=_math_verify_timeout(timeout_seconds))


def _stated_answers(text: str) -> list[str]:
    """Spans of `text` that state an answer: boxed, `<answer>` tags, "answer is X", "= X"."""
    spans = extract_boxed(text) + _ANSWER_TAG_RE.findall(text)
    spans += [m.group(1) for m in _STATED_RE.finditer(text)]
    return [s.strip() for s in spans if s.strip()]


def answer_leaked(text: str, ground_truth: str) -> bool:
    """True when `text` states an answer equivalent to `ground_truth`.

    A statement is a `\\boxed{}`, an `<answer>` tag, or a clause after "answer is", "answer:",
    "result is", "solution is", "equals" or "="; each is compared with `answers_equivalent`
    (normalized text, then math-verify). Besides, a ground truth of 3 or more normalized characters
    that appears verbatim as a whole word counts ("Paris", "144", "\\frac{1}{2}"); shorter ones
    ("7", "12") must be stated, since such numbers occur in most explanations.
    """
    if not ground_truth or not ground_truth.strip() or not text:
        return False
    gold = normalize_answer(ground_truth)
    if len(gold) >= 3:
        pattern = rf"(?<![\w\\]){re.escape(gold)}(?!\w)"
        if re.search(pattern, normalize_answer(text)):
            return True
    return any(answers_equivalent(span, ground_truth) for span in _stated_answers(text))


# ---------------------------------------------------------------------------------------------
# Verifiable reward functions (registered below as "common.rewards:<factory>")
# ---------------------------------------------------------------------------------------------
FORMAT_PATTERNS = {
    "thinking_answer": r"\s*<thinking>.+?</thinking>\s*<answer>.+?</answer>\s*",
    "thinking_teaching": r"\s*<thinking>.+?</thinking>\s*<teaching>.+?</teaching>\s*",
    "teaching": r".*?<teaching>.+?</teaching>\s*",
}


def _config_value(cfg, key: str, default):
    # Reward factories are also built without a script Config (tests, notebooks): cfg=None.
    return default if cfg is None else getattr(cfg, key, default)


def make_math_verify_reward(cfg=None) -> RewardFunction:
    """1.0 when the completion's final answer is mathematically equal to `ground_truth`, else 0.0.

    The final answer is the last `\\boxed{}`, else the last `<answer>` tag, else the last number.
    Config: `math_verify_timeout` (int seconds, default 5) bounds each math-verify parse and
    comparison on the main thread; in other threads it runs without a timeout (signal.alarm only
    works on the main thread) and answers over MAX_MATH_ANSWER_CHARS are compared as strings.
    Samples without a ground truth get None.
    """
    timeout_seconds = _config_value(cfg, "math_verify_timeout", 5)

    def math_verify_reward(batch: list[RewardInput]) -> list[Optional[float]]:
        rewards: list[Optional[float]] = []
        for sample in batch:
            if sample.ground_truth is None:
                rewards.append(None)
                continue
            answer = extract_final_answer(sample.completion)
            correct = answer is not None and answers_equivalent(answer, sample.ground_truth, timeout_seconds)
            rewards.append(1.0 if correct else 0.0)
        return rewards

    return math_verify_reward


def make_exact_match_reward(cfg=None) -> RewardFunction:
    """1.0 when the normalized final answer, or the whole normalized completion, equals the
    normalized `ground_truth` (case, whitespace, `$`, `\\text{}` and a trailing period ignored)."""

    def exact_match_reward(batch: list[RewardInput]) -> list[Optional[float]]:
        rewards: list[Optional[float]] = []
        for sample in batch:
            if sample.ground_truth is None:
                rewards.append(None)
                continue
            gold = normalize_answer(sample.ground_truth)
            answer = extract_final_answer(sample.completion)
            candidates = {normalize_answer(sample.completion)}
            if answer is not None:
                candidates.add(normalize_answer(answer))
            rewards.append(1.0 if gold and gold in candidates else 0.0)
        return rewards

    return exact_match_reward


def make_format_reward(cfg=None) -> RewardFunction:
    """1.0 when the whole completion matches `format_pattern`, else 0.0.

    Config: `format_pattern` (str, default "thinking_answer"): a name from FORMAT_PATTERNS or a
    Python regular expression, matched against the entire completion with re.DOTALL.
    """
    pattern = _config_value(cfg, "format_pattern", "thinking_answer")
    regex_text = FORMAT_PATTERNS.get(pattern, pattern)
    try:
        regex = re.compile(regex_text, re.DOTALL)
    except re.error as error:
        raise ValueError(
            f"config key `format_pattern`: {pattern!r} is neither a preset "
            f"({', '.join(sorted(FORMAT_PATTERNS))}) nor a valid regular expression: {error}"
        ) from error

    def format_reward(batch: list[RewardInput]) -> list[Optional[float]]:
        return [1.0 if regex.fullmatch(sample.completion) else 0.0 for sample in batch]

    return format_reward


# Group 1: a clean integer (a sentence's full stop may follow); group 2: a number-like token that is not one.
_FIRST_INTEGER_RE = re.compile(r"(?<![\w.])([-+]?\d+)(?!\w|\.\w)|([-+]?\d[\w.]*)")


def make_arithmetic_reward(cfg=None) -> RewardFunction:
    """Synthetic arithmetic (`12+34=` -> "46"): 1.0 when the completion's first integer equals the
    ground truth, else 0.0.

    Strict about the integer itself: "46" and "46\\n12+3=..." score 1, but "466", "46.0", "46abc"
    and "4 6" do not (the first number-like token must be exactly the integer). Text before the
    integer and anything after a following space, newline or punctuation ("46." is fine) is ignored. The ground truth
    must be an integer string; samples without one get None.
    """

    def arithmetic_reward(batch: list[RewardInput]) -> list[Optional[float]]:
        rewards: list[Optional[float]] = []
        for index, sample in enumerate(batch):
            if sample.ground_truth is None:
                rewards.append(None)
                continue
            try:
                gold = int(sample.ground_truth.strip())
            except ValueError:
                raise ValueError(
                    f"arithmetic reward: sample {index} has ground_truth {sample.ground_truth!r}; expected an integer string"
                ) from None
            match = _FIRST_INTEGER_RE.search(sample.completion)
            correct = match is not None and match.group(1) is not None and int(match.group(1)) == gold
            rewards.append(1.0 if correct else 0.0)
        return rewards

    return arithmetic_reward


REWARD_REGISTRY.update(
    {
        "math_verify": "common.rewards:make_math_verify_reward",
        "exact_match": "common.rewards:make_exact_match_reward",
        "format": "common.rewards:make_format_reward",
        "arithmetic": "common.rewards:make_arithmetic_reward",
    }
)


def combine_rewards(
    per_function: list[list[Optional[float]]], weights: Optional[list[float]] = None
) -> list[Optional[float]]:
    """Per sample, the weighted sum of the rewards that are not None; None when all are None.

    Weights of missing rewards are not renormalised away: a sample without a ground truth scores
    what its other functions give, on the same scale as every other sample. `weights` defaults to
    1.0 per function (config key `reward_weights`).
    """
    if not per_function:
        raise ValueError("combine_rewards: no reward functions given")
    weights = [1.0] * len(per_function) if weights is None else list(weights)
    if len(weights) != len(per_function):
        raise ValueError(
            f"`reward_weights` has {len(weights)} entries but there are {len(per_function)} reward functions"
        )
    num_samples = len(per_function[0])
    for index, rewards in enumerate(per_function):
        if len(rewards) != num_samples:
            raise ValueError(
                f"reward function {index} returned {len(rewards)} values for {num_samples} samples"
            )
    combined: list[Optional[float]] = []
    for sample in range(num_samples):
        present = [(w, rewards[sample]) for w, rewards in zip(weights, per_function) if rewards[sample] is not None]
        combined.append(sum(w * float(r) for w, r in present) if present else None)
    return combined


# ---------------------------------------------------------------------------------------------------------------------
# Scoring a batch on tensors (train_grpo.py)
# ---------------------------------------------------------------------------------------------------------------------

def score_rollouts(reward_functions: list, inputs: list) -> torch.Tensor:
    """[N, F] rewards of N samples under F (name, function) pairs, NaN where a function returned None."""
    columns = []
    for name, function in reward_functions:
        values = function(inputs)
        if len(values) != len(inputs):
            raise RuntimeError(f"reward function {name!r} returned {len(values)} values for {len(inputs)} samples")
        columns.append([math.nan if v is None else float(v) for v in values])
    return torch.tensor(columns, dtype=torch.float32).T.reshape(len(inputs), len(columns))


def weighted_rewards(per_function: torch.Tensor, weights: Optional[list[float]]) -> torch.Tensor:
    """[N, F] (NaN = None) -> [N]: `combine_rewards` on tensors, the weighted sum of the present rewards (no
    renormalisation), NaN where every function returned None. Summed in float64, as combine_rewards does."""
    weight = torch.tensor([1.0] * per_function.shape[1] if weights is None else weights, dtype=torch.float64)  # [F]
    summed = (per_function.double() * weight).nansum(dim=1)                  # [N] a None adds nothing
    return torch.where((~per_function.isnan()).any(dim=1), summed, math.nan).float()   # [N] all None: NaN


@dataclass
class RewardResult:
    """One generation batch's rewards, all processes' samples in rank order (N = processes x local samples)."""
    per_function: torch.Tensor   # [N, F] NaN where a function returned None
    combined: torch.Tensor       # [N] weighted sum; NaN where every function returned None
    advantages: torch.Tensor     # [N]
    stats: dict                    # reward_mean, reward_std, frac_reward_none, frac_zero_std_groups

    def local(self, rank: int, world: int) -> "RewardResult":
        """This process's samples (each process scores a contiguous block)."""
        return RewardResult(self.per_function.view(world, -1, self.per_function.shape[1])[rank],
                            self.combined.view(world, -1)[rank], self.advantages.view(world, -1)[rank], self.stats)
