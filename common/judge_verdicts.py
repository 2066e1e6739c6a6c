"""RIM judges, the pure part: trajectories, judge prompts, verdict parsing, escalation and aggregation.

No I/O here: common/judges.py calls the models (cache, retries, event loop) and uses these to turn replies into
a reward; common/judge_schema.py holds the reward-system file's keys.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Optional

from common.judge_prompts import ARBITER_SUFFIX, JUDGE_TEMPLATES, fence, render
from common.rewards import RewardInput

COMPLETION_ROLES = ("guidance", "answer")

# =============================================================================================
# Trajectories, verdicts, results
# =============================================================================================
@dataclass
class Trajectory:
    question: Optional[str] = None
    student_answer: Optional[str] = None
    ground_truth: Optional[str] = None
    student_plan: Optional[str] = None
    teacher_guidance: Optional[str] = None
    student_trace: Optional[str] = None
    baseline_answer: Optional[str] = None    # teacher GRPO: the student's answer without the guidance


TRAJECTORY_FIELDS = tuple(f.name for f in dataclasses.fields(Trajectory))


def trajectory_from_reward_input(item: RewardInput, completion_as: str = "guidance") -> Trajectory:
    if item.teaching is not None:   # a teacher-GRPO episode: every field from the trajectory itself
        episode = item.teaching
        return Trajectory(question=episode.question, student_plan=episode.approach,
                          teacher_guidance=episode.teaching, student_answer=episode.answer,
                          baseline_answer=episode.baseline_answer, ground_truth=item.ground_truth)
    meta = item.metadata or {}
    question = meta.get("question")
    if question is None:
        user_turns = [m.get("content") for m in item.messages or [] if m.get("role") == "user"]
        question = user_turns[-1] if user_turns else item.prompt
    if completion_as == "guidance":
        return Trajectory(question=question, teacher_guidance=item.completion,
                          student_plan=meta.get("student_approach"), student_trace=meta.get("student_trace"),
                          student_answer=meta.get("student_answer"), ground_truth=item.ground_truth)
    if completion_as == "answer":
        return Trajectory(question=question, student_answer=item.completion,
                          student_trace=meta.get("student_trace") or item.completion,
                          student_plan=meta.get("student_approach"), ground_truth=item.ground_truth)
    raise ValueError(f"completion_as must be one of {COMPLETION_ROLES}, got {completion_as!r}")


def judge_applies(judge: str, traj: Trajectory) -> bool:
    """Whether the trajectory has what this judge evaluates."""
    if judge == "accuracy":
        return bool(traj.student_answer)
    if judge == "helpfulness":
        return bool(traj.teacher_guidance)
    if judge == "process":
        return bool(traj.student_trace or traj.teacher_guidance or traj.student_answer)
    if judge == "diagnostic":
        return bool(traj.teacher_guidance and traj.student_plan)
    raise ValueError(f"unknown judge {judge!r}")


def judge_messages(judge: str, traj: Trajectory) -> list[dict]:
    values = {name: fence(name, getattr(traj, name)) for name in TRAJECTORY_FIELDS}
    return [{"role": "user", "content": render(JUDGE_TEMPLATES[judge], values)}]


def arbiter_messages(judge: str, traj: Trajectory, samples: list["Verdict"]) -> list[dict]:
    values = {name: fence(name, getattr(traj, name)) for name in TRAJECTORY_FIELDS}
    listed = json.dumps([{"score": s.score, "uncertainty": s.uncertainty, "rationale": s.rationale,
                          "gaming": s.gaming, "temperature": s.temperature} for s in samples], indent=1)
    values["samples"] = fence("grader assessments", listed if samples else "[] (every grader call failed)")
    return [{"role": "user", "content": render(JUDGE_TEMPLATES[judge] + ARBITER_SUFFIX, values)}]


@dataclass
class Verdict:
    score: float
    uncertainty: float
    rationale: str = ""
    principles: list = field(default_factory=list)
    gaming: bool = False
    model: str = ""
    temperature: float = 0.0


class InvalidReply(ValueError):
    pass


def _json_objects(text: str):
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _unit_number(obj: dict, key: str) -> float:
    value = obj.get(key)
    if isinstance(value, str):
        value = float(value) if re.fullmatch(r"\s*-?\d+(\.\d+)?\s*", value) else None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value <= 1 or math.isnan(value):
        raise InvalidReply(f"judge reply: {key!r} must be a number in [0, 1], got {obj.get(key)!r}")
    return float(value)


def parse_verdict(reply: str) -> Verdict:
    """The last JSON object with a "score" in the judge's own reply (never the prompt)."""
    candidates = [obj for obj in _json_objects(reply or "") if "score" in obj]
    if not candidates:
        raise InvalidReply(f"judge reply has no JSON object with a score: {(reply or '')[:120]!r}")
    obj = candidates[-1]
    principles = obj.get("principles", [])
    return Verdict(score=_unit_number(obj, "score"), uncertainty=_unit_number(obj, "uncertainty"),
                   rationale=str(obj.get("rationale", "")),
                   principles=principles if isinstance(principles, list) else [principles],
                   gaming=obj.get("gaming") is True)


@dataclass
class JudgeResult:
    judge: str
    score: Optional[float]                     # None: no valid verdict
    samples: list[Verdict] = field(default_factory=list)
    final: Optional[Verdict] = None            # the large model's verdict when escalated
    escalated: bool = False
    escalation_reason: str = ""
    gaming: bool = False


@dataclass
class TrajectoryScore:
    reward: Optional[float]                    # None: no judge could score it
    judges: dict[str, JudgeResult] = field(default_factory=dict)
    answer_leaked: bool = False
    capped: bool = False


class JudgeFailureError(RuntimeError):
    """Too many judge calls failed for too many consecutive steps."""


# =============================================================================================
# Aggregation (pure)
# =============================================================================================
def escalation_reason(samples: list[Verdict], variance_threshold: float, uncertainty_threshold: float) -> str:
    if not samples:
        return "no_valid_sample"
    scores = [s.score for s in samples]
    if max(scores) - min(scores) > variance_threshold:
        return "spread"
    if any(s.uncertainty > uncertainty_threshold for s in samples):
        return "uncertainty"
    return ""


def aggregate(samples: list[Verdict], mode: str) -> tuple[float, bool]:
    """(score, gaming flag) of non-escalated samples."""
    if mode == "lowest_uncertainty":
        best = min(samples, key=lambda s: s.uncertainty)   # ties: the first (lowest temperature)
        return best.score, best.gaming
    if mode == "mean":
        return sum(s.score for s in samples) / len(samples), 2 * sum(s.gaming for s in samples) > len(samples)
    raise ValueError(f"unknown aggregation {mode!r}")


def combine_judges(scores: dict[str, Optional[float]], weights: Optional[dict[str, float]]) -> Optional[float]:
    """Weighted mean over the judges that produced a score; None when none did."""
    present = {name: s for name, s in scores.items() if s is not None}
    if not present:
        return None
    w = {name: (weights or {}).get(name, 1.0) for name in present}
    total = sum(w.values())
    if total == 0:
        return None
    return sum(w[n] * present[n] for n in present) / total
