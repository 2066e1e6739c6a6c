"""Teacher rewards: they read the whole episode (`RewardInput.teaching`, built by common/teaching.py).

teaching_improvement  the student's correctness with the teaching against its correctness alone:
                      wrong -> right  1 + bonus; right -> right  `teaching_partial_credit` + bonus;
                      right -> wrong  `teaching_degradation_penalty` (<= 0); wrong -> wrong  0.
                      bonus = `teaching_efficiency_bonus` x (1 - teaching tokens / max_completion_length), >= 0.
                      Correctness comes from `teaching_answer_checker` (math_verify | arithmetic | exact_match).
rlt                   (Sakana's RLT) the student's log-likelihood of the reference solution given the teaching,
                      minus the KL(teacher || student) over the teaching tokens, both at `rlt_temperature`:
                      c1 . [mean, min](log p_student(solution tokens)) - c2 . [mean, max](KL per teaching token),
                      c1 = `rlt_answer_log_prob_coeff` ([1, 0.01]), c2 = `rlt_kl_penalty_coeff` ([3, 0.03]).
                      The teacher side is the current policy, or the frozen reference with
                      `use_reference_teacher_model: true`. Needs the student's tokenizer to be the teacher's and a
                      reference-solution column (`rlt_solution_column`).
Both: a sample without a ground truth, or whose student call failed, gets None (never 0); a teaching that states
the ground truth (`common.rewards.answer_leaked`) is capped at `teaching_leak_cap` and counted.
"""
from __future__ import annotations

from typing import Callable, Optional

from common.rewards import RewardInput, answer_leaked

ANSWER_CHECKERS = ("math_verify", "arithmetic", "exact_match")


def _value(cfg, key: str, default):
    return default if cfg is None else getattr(cfg, key, default)


def _leaked(item: RewardInput) -> bool:
    episode = item.teaching
    if episode.leaked is None:
        episode.leaked = bool(item.ground_truth) and answer_leaked(episode.teaching, item.ground_truth)
    return episode.leaked


def _require_episode(name: str, item: RewardInput) -> None:
    if item.teaching is None:
        raise ValueError(f"reward {name!r} reads the teacher episode (RewardInput.teaching); it runs only in a "
                         f"teacher run (trainer: teacher_grpo, which sets trainer_args)")


class TeachingImprovementReward:
    def __init__(self, cfg=None):
        from common.teaching import answer_checker

        self.partial_credit = float(_value(cfg, "teaching_partial_credit", 0.5))
        self.penalty = float(_value(cfg, "teaching_degradation_penalty", 0.0))
        self.bonus_weight = float(_value(cfg, "teaching_efficiency_bonus", 0.0))
        self.cap = float(_value(cfg, "teaching_leak_cap", 0.3))
        self.budget = _value(cfg, "max_completion_length", None)
        checker = _value(cfg, "teaching_answer_checker", "math_verify")
        if checker not in ANSWER_CHECKERS:
            raise ValueError(f"key 'teaching_answer_checker' = {checker!r}: expected one of {', '.join(ANSWER_CHECKERS)}")
        if self.penalty > 0:
            raise ValueError(f"key 'teaching_degradation_penalty' = {self.penalty}: expected a value <= 0")
        if self.bonus_weight and not self.budget:
            raise ValueError("key 'teaching_efficiency_bonus' needs max_completion_length (the teaching length scale)")
        self.correct = answer_checker(checker, cfg)
        self._capped = 0

    def __call__(self, batch: list[RewardInput]) -> list[Optional[float]]:
        return [self.score(item) for item in batch]

    def score(self, item: RewardInput) -> Optional[float]:
        _require_episode("teaching_improvement", item)
        episode = item.teaching
        if item.ground_truth is None or episode.student_failed:
            return None
        after = self.correct(episode.answer, item.ground_truth)
        before = self.correct(episode.baseline_answer, item.ground_truth)
        if after is None or before is None:
            return None
        bonus = 0.0
        if self.bonus_weight:
            bonus = self.bonus_weight * max(0.0, 1.0 - episode.teaching_tokens / self.budget)
        if after and not before:
            reward = 1.0 + bonus
        elif after:
            reward = self.partial_credit + bonus
        elif before:
            reward = self.penalty
        else:
            reward = 0.0
        if _leaked(item) and reward > self.cap:
            reward = self.cap
            self._capped += 1
        return reward

    def pop_metrics(self) -> dict[str, float]:
        capped, self._capped = self._capped, 0
        return {"rewards/teaching_improvement/capped": float(capped)}


def make_teaching_improvement_reward(cfg=None) -> TeachingImprovementReward:
    return TeachingImprovementReward(cfg)


# ---------------------------------------------------------------------------------------------------------------------
# RLT
# ---------------------------------------------------------------------------------------------------------------------
_SENTINEL = "\x00TEACHING\x00"


def reduce(values, reductions: tuple[str, ...], coefficients: list[float]) -> float:
    """sum_i coefficients[i] * reductions[i](values); 0 for no values."""
    import torch

    if values.numel() == 0:
        return 0.0
    functions = {"mean": torch.mean, "min": torch.min, "max": torch.max}
    return float(sum(c * functions[r](values).item() for r, c in zip(reductions, coefficients)))


class RLTReward:
    """Call `attach(...)` once the models exist (train_grpo.py does), then score batches."""

    def __init__(self, cfg=None):
        self.temperature = float(_value(cfg, "rlt_temperature", 1.0))
        self.answer_coeff = list(_value(cfg, "rlt_answer_log_prob_coeff", [1.0, 0.01]))
        self.kl_coeff = list(_value(cfg, "rlt_kl_penalty_coeff", [3.0, 0.03]))
        self.column = _value(cfg, "rlt_solution_column", "solution")
        self.cap = float(_value(cfg, "teaching_leak_cap", 0.3))
        args = _value(cfg, "trainer_args", None)
        from common.teaching import DEFAULT_TEMPLATES
        self.template = args.student_with_teaching_template if args is not None else \
            DEFAULT_TEMPLATES["student_with_teaching_template"]
        if not self.temperature > 0:
            raise ValueError(f"key 'rlt_temperature' = {self.temperature}: expected > 0")
        for key, value in (("rlt_answer_log_prob_coeff", self.answer_coeff), ("rlt_kl_penalty_coeff", self.kl_coeff)):
            if len(value) != 2:
                raise ValueError(f"key '{key}' = {value}: expected two coefficients [mean, extreme]")
        if "{teaching}" not in self.template:
            raise ValueError("reward 'rlt' places the teaching in trainer_args.student_with_teaching_template, which "
                             "has no {teaching} placeholder")
        self.student_logits: Optional[Callable] = None
        self.teacher_logits: Optional[Callable] = None
        self.tokenizer = None
        self._capped = 0
        self._terms: list[tuple[float, float]] = []

    def attach(self, student_logits: Callable, teacher_logits: Callable, tokenizer) -> None:
        """student_logits / teacher_logits: token ids [L] -> logits [L, V] (no grad); tokenizer: shared by both."""
        self.student_logits, self.teacher_logits, self.tokenizer = student_logits, teacher_logits, tokenizer

    def check_examples(self, examples: list) -> None:
        """Start-up: every training row needs a reference solution."""
        missing = [i for i, e in enumerate(examples) if e.metadata.get(self.column) in (None, "")]
        if missing:
            raise ValueError(f"reward 'rlt' needs a reference solution in column {self.column!r} "
                             f"(key 'rlt_solution_column'); {len(missing)} of {len(examples)} rows lack it, the first "
                             f"at index {missing[0]}")

    def __call__(self, batch: list[RewardInput]) -> list[Optional[float]]:
        return [self.score(item) for item in batch]

    def terms(self, item: RewardInput) -> tuple[float, float]:
        """(solution term, KL term) of one sample, before the cap."""
        import torch

        from common.teaching import user_prompt_text

        if self.student_logits is None:
            raise RuntimeError("RLTReward.attach() was not called: the reward has no models")
        episode, tok = item.teaching, self.tokenizer
        solution = str(item.metadata[self.column])
        encode = lambda text: tok(text, add_special_tokens=False).input_ids  # noqa: E731
        teaching_ids = encode(episode.teaching)
        # student: its with-teaching prompt, then the reference solution as its answer
        rendered = user_prompt_text(tok, self.template.replace("{teaching}", _SENTINEL).replace(
            "{question}", episode.question))
        before, after = rendered.split(_SENTINEL, 1)
        head, tail, solution_ids = encode(before), encode(after), encode(solution)
        student_ids = head + teaching_ids + tail + solution_ids
        # teacher: its prompt, its completion up to the teaching, then the teaching
        start = episode.teacher_text.find(episode.teaching) if episode.teaching else len(episode.teacher_text)
        teacher_head = encode(item.prompt) + encode(episode.teacher_text[:max(start, 0)])
        teacher_ids = teacher_head + teaching_ids
        with torch.no_grad():
            student = torch.log_softmax(self.student_logits(student_ids).float() / self.temperature, dim=-1)  # [L, V]
            # the logits at position j - 1 predict token j
            sol_pos = torch.arange(len(student_ids) - len(solution_ids), len(student_ids))
            solution_logps = student[sol_pos - 1, torch.tensor(solution_ids, dtype=torch.long)]               # [S]
            # the teacher forward runs even for an empty teaching: under ZeRO-3 every process runs the same forwards
            teacher = torch.log_softmax(self.teacher_logits(teacher_ids).float() / self.temperature, dim=-1)   # [L', V]
            t_pos = torch.arange(len(teacher_head), len(teacher_ids)) - 1
            s_pos = torch.arange(len(head), len(head) + len(teaching_ids)) - 1
            t, s = teacher[t_pos], student[s_pos]                                                              # [T, V]
            kl = (t.exp() * (t - s)).sum(-1)                                                                   # [T]
        return (reduce(solution_logps, ("mean", "min"), self.answer_coeff),
                reduce(kl, ("mean", "max"), self.kl_coeff))

    def score(self, item: RewardInput) -> Optional[float]:
        _require_episode("rlt", item)
        if item.teaching.approach is None:   # the student's diagnostic failed: the teacher prompt lacks it
            return None
        solution_term, kl_term = self.terms(item)
        self._terms.append((solution_term, kl_term))
        reward = solution_term - kl_term
        if _leaked(item) and reward > self.cap:
            reward = self.cap
            self._capped += 1
        return reward

    def pop_metrics(self) -> dict[str, float]:
        capped, terms = self._capped, self._terms
        self._capped, self._terms = 0, []
        out = {"rewards/rlt/capped": float(capped)}
        if terms:
            out["rewards/rlt/solution_term"] = sum(t[0] for t in terms) / len(terms)
            out["rewards/rlt/kl_term"] = sum(t[1] for t in terms) / len(terms)
        return out


def make_rlt_reward(cfg=None) -> RLTReward:
    return RLTReward(cfg)
