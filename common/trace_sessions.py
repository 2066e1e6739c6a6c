"""Runtime traces, step 1: a JSONL export of the Atlas SDK (plain, .gz or .xz) -> `TraceSession`s.

Each line is parsed into a `TraceSession` (unknown fields kept in `extra`) and the fields common/traces.py reads
are type-checked: a bad line is a `TraceRecordError` (a `ValueError`) naming file, line and field, or, with
`on_bad_record: skip`, is skipped and counted in the `LoadSummary`. Building records from sessions is
common/traces.py's job.
"""
from __future__ import annotations

import gzip
import json
import lzma
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

BAD_RECORD_POLICIES = ("error", "skip")

# Session fields the export always writes, then optional ones, each with the type this module relies on.
# `None` as a type means "any JSON value": the field is kept but not interpreted, so its type may vary.
SESSION_FIELDS: dict[str, Any] = {
    "task": str, "final_answer": str, "plan": dict, "steps": list, "session_metadata": dict,
    "session_reward": dict, "reward_summary": dict, "reward_stats": None, "reward_audit": None,
    "execution_mode": str, "review_status": str, "review_notes": str, "student_learning": str,
    "teacher_learning": str, "learning_key": str, "learning_history": None, "teacher_notes": None,
    "adaptive_summary": None, "triage_dossier": None, "personas_used": None, "persona_updates": None,
    "drift": None, "drift_alert": None, "trajectory_events": list,
}
SESSION_ALWAYS = ("task", "final_answer", "plan", "steps", "session_metadata")
STEP_FIELDS: dict[str, Any] = {
    "step_id": int, "description": str, "trace": str, "output": str, "reward": dict, "tool": str,
    "tool_params": dict, "context": dict, "validation": dict, "attempts": int, "guidance": list,
    "artifacts": None, "deliverable": None, "runtime": None, "metadata": dict,
}
STEP_ALWAYS = ("step_id", "description", "trace", "output", "reward", "tool", "tool_params", "context",
               "validation", "attempts", "guidance", "metadata")


# ---------------------------------------------------------------------------------------------------------------------
# Session dataclasses
# ---------------------------------------------------------------------------------------------------------------------

@dataclass
class TraceStep:
    step_id: int
    description: str = ""
    trace: str = ""
    output: str = ""
    reward: Optional[dict] = None          # {"score", "judges", "rationale", "raw"?}; older exports: `evaluation`
    tool: Optional[str] = None
    tool_params: dict = field(default_factory=dict)
    context: dict = field(default_factory=dict)   # {"prior_results": {...}, "prior_results_text": {id: text}}
    validation: dict = field(default_factory=dict)
    attempts: Optional[int] = None
    guidance: list = field(default_factory=list)  # the teacher's notes during the step, in order
    artifacts: Any = None
    deliverable: Any = None
    runtime: Any = None
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)     # fields this module does not know, kept as read

    @property
    def reward_score(self) -> Optional[float]:
        return _score(self.reward)

    def to_dict(self) -> dict:
        """The step as the export wrote it (known fields plus `extra`)."""
        return _fields_to_dict(self, STEP_FIELDS, STEP_ALWAYS)


@dataclass
class TraceSession:
    task: str
    source: str                                   # file the session was read from
    line: int                                     # 1-based line number in that file
    final_answer: str = ""
    plan: dict = field(default_factory=dict)
    steps: list = field(default_factory=list)     # list[TraceStep]
    session_metadata: dict = field(default_factory=dict)
    session_reward: Optional[dict] = None
    reward_summary: Optional[dict] = None
    reward_stats: Any = None
    reward_audit: Any = None
    execution_mode: Optional[str] = None
    review_status: Optional[str] = None
    review_notes: Optional[str] = None
    student_learning: Optional[str] = None
    teacher_learning: Optional[str] = None
    learning_key: Optional[str] = None
    learning_history: Any = None
    teacher_notes: Any = None
    adaptive_summary: Any = None
    triage_dossier: Any = None
    personas_used: Any = None
    persona_updates: Any = None
    drift: Any = None
    drift_alert: Any = None
    trajectory_events: Optional[list] = None
    extra: dict = field(default_factory=dict)

    @property
    def location(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def reward_score(self) -> Optional[float]:
        """Session reward score, else the reward summary's score, else None."""
        score = _score(self.session_reward)
        return score if score is not None else _score(self.reward_summary)

    @property
    def status(self) -> Optional[str]:
        value = self.session_metadata.get("status", self.extra.get("status"))
        return None if value is None else str(value)

    @property
    def effective_review_status(self) -> Optional[str]:
        value = self.review_status or self.session_metadata.get("review_status")
        return None if value is None else str(value)

    @property
    def events(self) -> list:
        """Trajectory events: the top-level copy, else the one inside session_metadata."""
        if self.trajectory_events:
            return self.trajectory_events
        nested = self.session_metadata.get("trajectory_events")
        return nested if isinstance(nested, list) else []

    def to_dict(self) -> dict:
        """The session as the export wrote it (known fields plus `extra`)."""
        data = _fields_to_dict(self, SESSION_FIELDS, SESSION_ALWAYS)
        data["steps"] = [step.to_dict() for step in self.steps]
        return data


def _fields_to_dict(obj, fields: dict, always: tuple) -> dict:
    data = {name: getattr(obj, name) for name in fields if name in always or getattr(obj, name) is not None}
    data.update(obj.extra)
    return data


def _score(reward: Optional[dict]) -> Optional[float]:
    if not reward or reward.get("score") is None:
        return None
    return float(reward["score"])


# ---------------------------------------------------------------------------------------------------------------------
# Parsing and validation
# ---------------------------------------------------------------------------------------------------------------------

class TraceRecordError(ValueError):
    """A line that is not a valid session; the message names file and line."""


def _type_name(expected) -> str:
    return {str: "a string", int: "an integer", float: "a number", dict: "an object", list: "a list"}[expected]


def _check_type(value: Any, expected, where: str, key: str) -> Any:
    if expected is None or value is None:
        return value
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if not ok:
        raise TraceRecordError(f"{where}: field '{key}': expected {_type_name(expected)}, "
                               f"got {type(value).__name__} {_short(value)}")
    return value


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_reward(reward: Any, where: str, key: str) -> Optional[dict]:
    if reward is None:
        return None
    _check_type(reward, dict, where, key)
    score = reward.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise TraceRecordError(f"{where}: field '{key}.score': expected a number, got {_short(score)}")
    _check_type(reward.get("judges"), list, where, f"{key}.judges")
    return reward


def _reward_from_evaluation(evaluation: Any, where: str) -> tuple[Optional[dict], Optional[dict]]:
    """Older exports: `evaluation` is {"reward": {...}, "validation": {...}} or the reward itself."""
    if evaluation is None:
        return None, None
    _check_type(evaluation, dict, where, "evaluation")
    if "reward" in evaluation or "validation" in evaluation:
        reward = _check_reward(evaluation.get("reward"), where, "evaluation.reward")
        validation = _check_type(evaluation.get("validation"), dict, where, "evaluation.validation")
        return reward, validation
    return _check_reward(evaluation, where, "evaluation"), None


def parse_step(data: Any, where: str) -> TraceStep:
    if not isinstance(data, dict):
        raise TraceRecordError(f"{where}: expected a step object, got {type(data).__name__}")
    if data.get("step_id") is None:
        raise TraceRecordError(f"{where}: missing required field 'step_id'")
    values = {key: _check_type(data.get(key), expected, where, key)
              for key, expected in STEP_FIELDS.items() if data.get(key) is not None}
    _check_reward(values.get("reward"), where, "reward")
    if "reward" not in values:
        reward, validation = _reward_from_evaluation(data.get("evaluation"), where)
        if reward is not None:
            values["reward"] = reward
        if validation is not None and "validation" not in values:
            values["validation"] = validation
    for index, note in enumerate(values.get("guidance", [])):
        _check_type(note, str, where, f"guidance[{index}]")
    _check_type(values.get("metadata", {}).get("system_prompt"), str, where, "metadata.system_prompt")
    extra = {key: value for key, value in data.items() if key not in STEP_FIELDS}
    return TraceStep(**values, extra=extra)


def parse_session(data: Any, source: str, line: int) -> TraceSession:
    """One JSON value -> TraceSession, or TraceRecordError naming the file, line and field."""
    where = f"{source}:{line}"
    if not isinstance(data, dict):
        raise TraceRecordError(f"{where}: expected a JSON object (one session per line), got {type(data).__name__}")
    for required in ("task", "steps"):
        if data.get(required) is None:
            raise TraceRecordError(f"{where}: missing required field '{required}'")
    values = {key: _check_type(data.get(key), expected, where, key)
              for key, expected in SESSION_FIELDS.items() if data.get(key) is not None}
    _check_reward(values.get("session_reward"), where, "session_reward")
    _check_reward(values.get("reward_summary"), where, "reward_summary")
    metadata = values.get("session_metadata", {})
    _check_type(metadata.get("system_prompt"), str, where, "session_metadata.system_prompt")
    _check_type(data.get("system_prompt"), str, where, "system_prompt")
    _check_type(metadata.get("trajectory_events"), list, where, "session_metadata.trajectory_events")
    values["steps"] = [parse_step(step, f"{where}: steps[{index}]") for index, step in enumerate(values["steps"])]
    extra = {key: value for key, value in data.items() if key not in SESSION_FIELDS}
    return TraceSession(**values, source=source, line=line, extra=extra)


def _open_binary(path: Path):
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(path, "rb")
    return open(path, "rb")


@dataclass
class LoadSummary:
    """Counts reported after a load; `bad_lines` holds the first few skipped lines' errors."""
    path: str
    lines: int = 0
    sessions: int = 0
    skipped: int = 0
    bad_lines: list = field(default_factory=list)
    filtered: Counter = field(default_factory=Counter)
    kept: int = 0
    records: int = 0
    record_type: str = ""

    def __str__(self) -> str:
        text = f"runtime traces {self.path}: {self.lines} lines, {self.sessions} sessions parsed"
        if self.skipped:
            text += f", {self.skipped} bad lines skipped ({'; '.join(self.bad_lines)})"
        if self.filtered:
            text += ", filtered out: " + ", ".join(f"{n} {why}" for why, n in sorted(self.filtered.items()))
        if self.record_type:
            text += f"; {self.records} {self.record_type} records from {self.kept} sessions"
        return text


def iter_sessions(path: str | Path, on_bad_record: str = "error",
                  summary: Optional[LoadSummary] = None) -> Iterator[TraceSession]:
    """Stream sessions from a JSONL export (plain, gzip or xz by content). Blank lines are ignored."""
    if on_bad_record not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record={on_bad_record!r}: expected one of {', '.join(BAD_RECORD_POLICIES)}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"runtime traces file not found: {path} (key 'dataset_path', relative to {Path.cwd()})")
    summary = summary if summary is not None else LoadSummary(str(path))
    line_number = 0
    with _open_binary(path) as handle:
        lines = iter(handle)
        while True:
            try:
                raw = next(lines)
            except StopIteration:
                break
            except (OSError, EOFError, lzma.LZMAError) as err:  # truncated or corrupt compressed stream
                raise ValueError(f"{path}:{line_number + 1}: cannot read compressed data ({err})") from None
            line_number += 1
            summary.lines = line_number
            if not raw.strip():
                continue
            try:
                session = _parse_line(raw, path, line_number)
            except TraceRecordError as err:
                if on_bad_record == "error":
                    raise
                summary.skipped += 1
                if len(summary.bad_lines) < 3:
                    summary.bad_lines.append(str(err))
                continue
            summary.sessions += 1
            yield session


def _parse_line(raw: bytes, path: Path, line_number: int) -> TraceSession:
    where = f"{path}:{line_number}"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise TraceRecordError(f"{where}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise TraceRecordError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
    return parse_session(data, str(path), line_number)


def no_sessions_error(path, summary: LoadSummary) -> ValueError:
    detail = f"; {summary.skipped} bad lines skipped: {'; '.join(summary.bad_lines)}" if summary.skipped else ""
    return ValueError(f"{path}: no sessions found ({summary.lines} lines read{detail}); expected one JSON session "
                      f"per line as written by `arc-atlas export`")


def load_sessions(path: str | Path, on_bad_record: str = "error") -> tuple[list[TraceSession], LoadSummary]:
    """All sessions of a file; an empty file (or one with no valid session) is an error."""
    summary = LoadSummary(str(path))
    sessions = list(iter_sessions(path, on_bad_record, summary))
    if not sessions:
        raise no_sessions_error(path, summary)
    return sessions, summary
