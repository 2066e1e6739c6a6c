"""Runtime traces: JSONL sessions exported by the Atlas SDK -> `Example` records.

The export (`arc-atlas export --output traces/export.jsonl`, format in the spec's runtime-traces page) holds one
session per line: the task, the plan, the executed steps (student output, reward breakdown, teacher guidance) and
free-form metadata. Real files are uneven: fields appear in some sessions only, nested values change type from
one session to the next, newer SDK versions add top-level fields. This module

1. streams a file (plain, .gz or .xz), parses each line into a `TraceSession` (unknown fields kept in `extra`)
   and checks the types of the fields it reads: a bad line is a `ValueError` naming file and line, or, with
   `on_bad_record: skip`, is skipped and counted in the summary printed at load;
2. filters sessions (`status_filters`, `review_status_filters`, `min_reward`);
3. builds records:
   - `grpo`: one per step; the prompt is the executor's view of the step (task, step, tool, earlier results,
     guidance so far, previous validation); the recorded reward breakdown and output ride along in metadata;
   - `sft` (also the records GKD trains on): the assistant target is the teacher's guidance, from teacher
     trajectory events when the session has them, else from the steps' `guidance` notes.
4. makes `metadata` columns Arrow-safe: every record has the union of all columns, and nested or mixed-type values
   are JSON text, so `datasets.Dataset.from_list` never sees two types in one column.

Entry point for a data preset: `make_dataset_fn: {_target_: common.traces.get_runtime_trace_dataset, ...}`.
"""
from __future__ import annotations

import gzip
import json
import lzma
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

from common.data import Example

DEFAULT_EXECUTOR_SYSTEM_PROMPT = (
    "You carry out one step of a plan for a larger task. Use the task, the step's tool and parameters, the "
    "results of earlier steps and any guidance you were given, and reply with the result of this step."
)
DEFAULT_TEACHER_SYSTEM_PROMPT = (
    "You supervise a student who carries out a task step by step. Read the task and the student's work, then "
    "give short, concrete guidance that helps the student get the step right."
)
RECORD_TYPES = ("grpo", "sft")
BAD_RECORD_POLICIES = ("error", "skip")
DEFAULT_REVIEW_STATUSES = ("approved",)

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
# Event keys that hold what an actor said, most specific first; keys whose subtree is model input, not output.
EVENT_TEXT_KEYS = ("guidance", "message", "text", "content", "output")
EVENT_SKIP_KEYS = frozenset({"input", "inputs", "chat_inputs", "span_inputs", "tool_inputs", "messages",
                             "prompt", "validation_request", "function_ancestry"})
MAX_EVENT_DEPTH = 8


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


def _no_sessions_error(path, summary: LoadSummary) -> ValueError:
    detail = f"; {summary.skipped} bad lines skipped: {'; '.join(summary.bad_lines)}" if summary.skipped else ""
    return ValueError(f"{path}: no sessions found ({summary.lines} lines read{detail}); expected one JSON session "
                      f"per line as written by `arc-atlas export`")


def load_sessions(path: str | Path, on_bad_record: str = "error") -> tuple[list[TraceSession], LoadSummary]:
    """All sessions of a file; an empty file (or one with no valid session) is an error."""
    summary = LoadSummary(str(path))
    sessions = list(iter_sessions(path, on_bad_record, summary))
    if not sessions:
        raise _no_sessions_error(path, summary)
    return sessions, summary


# ---------------------------------------------------------------------------------------------------------------------
# Filters
# ---------------------------------------------------------------------------------------------------------------------

def _lowered(values, key: str) -> Optional[set]:
    if values is None:
        return None
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple)) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"make_dataset_fn.{key}: expected a list of strings, got {values!r}")
    return {v.lower() for v in values}


def filter_reason(session: TraceSession, min_reward: Optional[float], statuses: Optional[set],
                  review_statuses: Optional[set]) -> Optional[str]:
    """Why a session is left out, or None to keep it."""
    if statuses:
        if (session.status or "").lower() not in statuses:
            return "by status_filters"
    review = session.effective_review_status
    if review_statuses and review is not None and review.lower() not in review_statuses:
        return "by review_status_filters"
    if min_reward is not None:
        score = session.reward_score
        if score is None:
            return "without a reward (min_reward set)"
        if score < min_reward:
            return f"below min_reward={min_reward}"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Prompt rendering
# ---------------------------------------------------------------------------------------------------------------------

def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)


def _prior_results(step: TraceStep) -> list[tuple[str, str]]:
    """(step id, text) of the results the executor saw from earlier steps."""
    texts = step.context.get("prior_results_text")
    if isinstance(texts, dict) and texts:
        return [(str(k), v if isinstance(v, str) else _json_text(v)) for k, v in texts.items()]
    results = step.context.get("prior_results")
    if not isinstance(results, dict):
        return []
    rendered = []
    for key, value in results.items():
        text = value.get("output_text", value) if isinstance(value, dict) else value
        rendered.append((str(key), text if isinstance(text, str) else _json_text(text)))
    return rendered


def previous_validation(step: TraceStep) -> Optional[Any]:
    """The teacher's validation of the attempt before the recorded one (from the attempt history), if any.

    The step's own `validation` judges the recorded output, so it stays out of the prompt (it would leak the
    verdict); it is in the metadata instead."""
    history = step.metadata.get("attempt_history")
    if not isinstance(history, list) or len(history) < 2 or not isinstance(history[-2], dict):
        return None
    evaluation = history[-2].get("evaluation")
    if isinstance(evaluation, dict) and "validation" in evaluation:
        return evaluation["validation"] or None
    return evaluation or None


def _bullets(items: list[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def render_executor_user_turn(session: TraceSession, step: TraceStep) -> str:
    parts = [f"Task:\n{session.task}", f"Step {step.step_id}: {step.description}".rstrip()]
    if step.tool:
        parts.append(f"Tool: {step.tool}\nTool parameters: {_json_text(step.tool_params or {})}")
    depends_on = step.metadata.get("depends_on")
    if depends_on:
        parts.append(f"Depends on steps: {_json_text(depends_on)}")
    prior = _prior_results(step)
    if prior:
        parts.append("Results of earlier steps:\n" + "\n".join(f"[step {k}] {text}" for k, text in prior))
    if step.guidance:
        parts.append("Guidance so far:\n" + _bullets(step.guidance))
    validation = previous_validation(step)
    if validation is not None:
        parts.append(f"Previous validation: {validation if isinstance(validation, str) else _json_text(validation)}")
    return "\n\n".join(parts)


def executor_system_prompt(session: TraceSession, step: TraceStep, fallback: Optional[str]) -> str:
    """Recorded prompt (step, then session), else the config's `system_prompt`, else the default."""
    for candidate in (step.metadata.get("system_prompt"), step.extra.get("system_prompt"),
                      session.session_metadata.get("system_prompt"), session.extra.get("system_prompt")):
        if isinstance(candidate, str) and candidate.strip():
            return candidate
    return fallback or DEFAULT_EXECUTOR_SYSTEM_PROMPT


def executor_messages(session: TraceSession, step: TraceStep, system_prompt: Optional[str] = None) -> list[dict]:
    return [{"role": "system", "content": executor_system_prompt(session, step, system_prompt)},
            {"role": "user", "content": render_executor_user_turn(session, step)}]


def _student_work(step: TraceStep) -> str:
    parts = [f"Step {step.step_id}: {step.description}".rstrip()]
    if step.tool:
        parts.append(f"Tool: {step.tool} {_json_text(step.tool_params or {})}")
    if step.trace and step.trace.strip() != step.output.strip():
        parts.append(f"Transcript:\n{step.trace}")
    parts.append(f"Output:\n{step.output}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# Trajectory events -> (actor, text)
# ---------------------------------------------------------------------------------------------------------------------

def _find_keys(node: Any, keys: tuple) -> dict:
    """First non-empty string under each of `keys`, searched breadth-first through nested objects."""
    found: dict = {}
    frontier, depth = [node], 0
    while frontier and depth <= MAX_EVENT_DEPTH and len(found) < len(keys):
        next_frontier = []
        for item in frontier:
            for key in keys:
                value = item.get(key)
                if key not in found and isinstance(value, str) and value:
                    found[key] = value
            next_frontier.extend(v for k, v in item.items() if isinstance(v, dict) and k not in EVENT_SKIP_KEYS)
        frontier, depth = next_frontier, depth + 1
    return found


def _text_value(value: Any) -> Optional[str]:
    """Text held under a text key: a string, a list of strings, or an object with a text key inside."""
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, list):
        pieces = [_text_value(item) for item in value]
        return "\n".join(p for p in pieces if p) or None
    if isinstance(value, dict):
        return _find_text(value)
    return None


def _find_text(node: Any) -> Optional[str]:
    """Text under the shallowest text key (breadth-first), skipping subtrees that hold model input."""
    frontier = [node]
    for _ in range(MAX_EVENT_DEPTH):
        next_frontier = []
        for item in frontier:
            if isinstance(item, dict):
                for key in EVENT_TEXT_KEYS:
                    text = _text_value(item[key]) if key in item else None
                    if text:
                        return text
                next_frontier.extend(value for key, value in item.items() if isinstance(value, (dict, list))
                                     and key not in EVENT_TEXT_KEYS and key not in EVENT_SKIP_KEYS)
            elif isinstance(item, list):
                next_frontier.extend(value for value in item if isinstance(value, (dict, list)))
        if not next_frontier:
            break
        frontier = next_frontier
    return None


def _guidance_from_text(text: str) -> Optional[str]:
    """A teacher reply that is a JSON object counts through its `guidance` only (a plan review or a bare verdict
    is not guidance); plain text counts as is."""
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return text
        if isinstance(parsed, dict):
            guidance = parsed.get("guidance")
            return (guidance.strip() or None) if isinstance(guidance, str) else None
    return text


def event_turn(event: Any) -> Optional[tuple[str, str]]:
    """(actor, text) of a trajectory event, or None when it has no actor, no text, or is a start/stream event
    (those repeat the model input or a fragment of the final output)."""
    if not isinstance(event, dict):
        return None
    found = _find_keys(event, ("actor", "event_type", "type"))
    actor = found.get("actor")
    if not actor:
        return None
    event_type = (found.get("event_type") or found.get("type") or "").upper()
    if event_type.endswith("_START") or event_type.endswith("NEW_TOKEN") or event_type.endswith("CHUNK"):
        return None
    actor, text = actor.lower(), _find_text(event)
    if text and actor.startswith("teacher"):
        text = _guidance_from_text(text)
    return (actor, text) if text else None


# ---------------------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------------------

def _ground_truth(*sources: dict) -> Optional[str]:
    for source in sources:
        value = source.get("ground_truth")
        if value is not None:
            return value if isinstance(value, str) else _json_text(value)
    return None


def _session_columns(session: TraceSession) -> dict:
    """Every top-level field of the session (unknown ones included) as a `session_*` column; the steps and the
    trajectory events are left out (they are per-step columns / the SFT targets)."""
    data = session.to_dict()
    data.pop("steps")
    data.pop("trajectory_events", None)
    if "trajectory_events" in data["session_metadata"]:
        data["session_metadata"] = {k: v for k, v in data["session_metadata"].items() if k != "trajectory_events"}
    columns = {key if key.startswith("session_") else f"session_{key}": value for key, value in data.items()}
    columns.setdefault("session_id", session.session_metadata.get("session_id"))
    columns.update(session_reward_score=session.reward_score, source_file=session.source, source_line=session.line)
    return columns


def _step_columns(step: TraceStep) -> dict:
    columns = {key if key.startswith("step_") else f"step_{key}": value for key, value in step.to_dict().items()}
    columns["step_reward_score"] = step.reward_score
    return columns


def grpo_records(session: TraceSession, system_prompt: Optional[str] = None) -> list[Example]:
    """One RL prompt per step: the executor's view of the step; the recorded output and reward as columns."""
    records, session_columns = [], _session_columns(session)
    for index, step in enumerate(session.steps):
        metadata = {**session_columns, **_step_columns(step), "step_index": index}
        records.append(Example(
            prompt=executor_messages(session, step, system_prompt),
            completion=None,
            ground_truth=_ground_truth(step.extra, step.metadata, session.extra, session.session_metadata),
            metadata=metadata,
        ))
    return records


def _conversation_records(messages: list[dict]) -> list[tuple[list[dict], str]]:
    """(prompt, target) for every assistant turn; turns after the last assistant turn give no record."""
    return [([dict(m) for m in messages[:i]], messages[i]["content"])
            for i, message in enumerate(messages) if message["role"] == "assistant"]


def _append_turn(messages: list[dict], role: str, text: str) -> None:
    if messages[-1]["role"] == role:  # consecutive turns of one actor merge, so roles alternate
        messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + text}
    else:
        messages.append({"role": role, "content": text})


def teacher_event_conversation(session: TraceSession, system_prompt: Optional[str] = None) -> Optional[list[dict]]:
    """The session as a teacher conversation from its trajectory events: student turns as user messages, teacher
    turns as assistant messages. None when no teacher event has text."""
    turns = [turn for turn in map(event_turn, session.events) if turn]
    turns = [(actor, text) for actor, text in turns if actor.startswith(("teacher", "student"))]
    if not any(actor.startswith("teacher") for actor, _ in turns):
        return None
    opening = f"Task:\n{session.task}"
    if not any(actor.startswith("student") for actor, _ in turns) and session.steps:
        opening += "\n\nStudent's work:\n" + "\n\n".join(_student_work(step) for step in session.steps)
    messages = [{"role": "system", "content": system_prompt or DEFAULT_TEACHER_SYSTEM_PROMPT},
                {"role": "user", "content": opening}]
    for actor, text in turns:
        if actor.startswith("teacher"):
            _append_turn(messages, "assistant", text)
        else:
            _append_turn(messages, "user", f"Student:\n{text}")
    return messages


def step_guidance_conversations(session: TraceSession, system_prompt: Optional[str] = None):
    """One conversation per guidance note: task, the step and the student's work, earlier notes -> the note."""
    for step in session.steps:
        for index, note in enumerate(step.guidance):
            if not note.strip():
                continue
            parts = [f"Task:\n{session.task}", f"Student's work:\n{_student_work(step)}"]
            prior = _prior_results(step)
            if prior:
                parts.insert(1, "Results of earlier steps:\n" + "\n".join(f"[step {k}] {t}" for k, t in prior))
            if index:
                parts.append("Guidance already given:\n" + _bullets(step.guidance[:index]))
            yield step, index, [{"role": "system", "content": system_prompt or DEFAULT_TEACHER_SYSTEM_PROMPT},
                                {"role": "user", "content": "\n\n".join(parts)},
                                {"role": "assistant", "content": note.strip()}]


def sft_records(session: TraceSession, system_prompt: Optional[str] = None) -> list[Example]:
    """Records whose target is the teacher's guidance (events first, else the steps' notes)."""
    columns = _session_columns(session)
    truth = _ground_truth(session.extra, session.session_metadata)
    conversation = teacher_event_conversation(session, system_prompt)
    if conversation is not None:
        return [Example(prompt=prompt, completion=target, ground_truth=truth,
                        metadata={**columns, "target_source": "trajectory_events", "turn_index": len(prompt)})
                for prompt, target in _conversation_records(conversation)]
    records = []
    for step, index, messages in step_guidance_conversations(session, system_prompt):
        for prompt, target in _conversation_records(messages):
            records.append(Example(prompt=prompt, completion=target, ground_truth=truth,
                                   metadata={**columns, "target_source": "step_guidance",
                                             "step_id": step.step_id, "guidance_index": index}))
    return records


# ---------------------------------------------------------------------------------------------------------------------
# Arrow-safe columns
# ---------------------------------------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "str"
    return "nested"


def arrow_safe_columns(rows: list[dict]) -> list[dict]:
    """Give every row the union of the columns (missing -> None); ints mixed with floats become floats; a column
    holding nested values or scalars of different types becomes JSON text in every row (None stays None)."""
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    kinds = {name: {_kind(row[name]) for row in rows if row.get(name) is not None} for name in names}
    out = []
    for row in rows:
        fixed = {}
        for name in names:
            value, column_kinds = row.get(name), kinds[name]
            if value is not None:
                if column_kinds == {"int", "float"}:
                    value = float(value)
                elif len(column_kinds) > 1 or column_kinds == {"nested"}:
                    value = _json_text(value)
            fixed[name] = value
        out.append(fixed)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

def get_runtime_trace_dataset(cfg, *, record_type: str = "grpo", min_reward: Optional[float] = None,
                              status_filters: Optional[list] = None,
                              review_status_filters: Optional[list] = DEFAULT_REVIEW_STATUSES,
                              on_bad_record: str = "error") -> list[Example]:
    """Examples from the export at `cfg.dataset_path` (relative paths from the working directory).

    record_type: `grpo` (one executor prompt per step) or `sft` (teacher-guidance targets; GKD uses these too).
    min_reward: keep sessions whose reward score (session reward, else reward summary) is >= this.
    status_filters: keep sessions whose status is one of these (case-insensitive); null keeps all.
    review_status_filters: keep sessions whose review status is one of these; sessions without a review status
        are kept; null or [] keeps all.
    on_bad_record: `error` (default) or `skip` bad lines (counted in the printed summary).
    Shuffling, `dataset_max_samples` and the eval split are applied by common/data.py afterwards.
    """
    if record_type not in RECORD_TYPES:
        raise ValueError(f"make_dataset_fn.record_type={record_type!r}: expected one of {', '.join(RECORD_TYPES)}")
    if min_reward is not None and (isinstance(min_reward, bool) or not isinstance(min_reward, (int, float))):
        raise ValueError(f"make_dataset_fn.min_reward={min_reward!r}: expected a number or null")
    path = getattr(cfg, "dataset_path", None)
    if not path:
        raise ValueError("runtime traces need `dataset_path` (an `arc-atlas export` JSONL file)")
    statuses = _lowered(status_filters, "status_filters")
    review_statuses = _lowered(review_status_filters, "review_status_filters")
    system_prompt = getattr(cfg, "system_prompt", None)
    build = grpo_records if record_type == "grpo" else sft_records

    summary = LoadSummary(str(path), record_type=record_type)
    examples: list[Example] = []
    for session in iter_sessions(path, on_bad_record, summary):  # streamed: raw sessions are not kept
        reason = filter_reason(session, min_reward, statuses, review_statuses)
        if reason:
            summary.filtered[reason] += 1
            continue
        summary.kept += 1
        examples.extend(build(session, system_prompt))
    if not summary.sessions:
        raise _no_sessions_error(path, summary)
    summary.records = len(examples)
    print(summary, flush=True)
    if not examples:
        raise ValueError(f"{summary}; no {record_type} records to train on (check the filters: status_filters="
                         f"{status_filters!r}, review_status_filters={review_status_filters!r}, "
                         f"min_reward={min_reward!r})")
    for example, metadata in zip(examples, arrow_safe_columns([e.metadata for e in examples])):
        example.metadata = metadata
    return examples
