"""Runtime traces: JSONL sessions exported by the Atlas SDK -> `Example` records.

The export (`arc-atlas export --output traces/export.jsonl`, format in the spec's runtime-traces page) holds one
session per line: the task, the plan, the executed steps (student output, reward breakdown, teacher guidance) and
free-form metadata. Real files are uneven: fields appear in some sessions only, nested values change type from
one session to the next, newer SDK versions add top-level fields. This module

1. streams a file into `TraceSession`s (common/trace_sessions.py: line parsing and type checks; a bad line is a
   `ValueError` naming file and line, or, with `on_bad_record: skip`, is skipped and counted in the summary
   printed at load);
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

import json
from typing import Any, Optional

from common.data import Example
from common.trace_sessions import LoadSummary, TraceSession, TraceStep, iter_sessions, no_sessions_error

DEFAULT_EXECUTOR_SYSTEM_PROMPT = (
    "You carry out one step of a plan for a larger task. Use the task, the step's tool and parameters, the "
    "results of earlier steps and any guidance you were given, and reply with the result of this step."
)
DEFAULT_TEACHER_SYSTEM_PROMPT = (
    "You supervise a student who carries out a task step by step. Read the task and the student's work, then "
    "give short, concrete guidance that helps the student get the step right."
)
RECORD_TYPES = ("grpo", "sft")
DEFAULT_REVIEW_STATUSES = ("approved",)
# Event keys that hold what an actor said, most specific first; keys whose subtree is model input, not output.
EVENT_TEXT_KEYS = ("guidance", "message", "text", "content", "output")
EVENT_SKIP_KEYS = frozenset({"input", "inputs", "chat_inputs", "span_inputs", "tool_inputs", "messages",
                             "prompt", "validation_request", "function_ancestry"})
MAX_EVENT_DEPTH = 8


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
        raise no_sessions_error(path, summary)
    summary.records = len(examples)
    print(summary, flush=True)
    if not examples:
        raise ValueError(f"{summary}; no {record_type} records to train on (check the filters: status_filters="
                         f"{status_filters!r}, review_status_filters={review_status_filters!r}, "
                         f"min_reward={min_reward!r})")
    for example, metadata in zip(examples, arrow_safe_columns([e.metadata for e in examples])):
        example.metadata = metadata
    return examples
