"""Runtime traces (Atlas SDK JSONL exports) -> GRPO / SFT records."""
from __future__ import annotations

import asyncio
import gzip
import importlib.util
import json
import lzma
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow
import pytest

from common.args import DataArgs
from common.trace_sessions import load_sessions
from common.traces import DEFAULT_EXECUTOR_SYSTEM_PROMPT, get_runtime_trace_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def step(step_id: int, **fields) -> dict:
    data = {"step_id": step_id, "description": f"step {step_id}", "trace": "", "output": f"out {step_id}",
            "reward": {"score": 0.5, "judges": [], "rationale": None}, "tool": None, "tool_params": {},
            "context": {"prior_results": {}, "prior_results_text": {}}, "validation": {}, "attempts": 1,
            "guidance": [], "metadata": {}}
    data.update(fields)
    return data


def session(task: str, steps: list, **fields) -> dict:
    data = {"task": task, "final_answer": "", "plan": {"steps": []}, "steps": steps,
            "session_metadata": {"status": "succeeded"}}
    data.update(fields)
    return data


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def load(path: Path, system_prompt=None, **kwargs):
    return get_runtime_trace_dataset(DataArgs(dataset_path=str(path), system_prompt=system_prompt), **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Files written by the arc-atlas exporter itself
# ---------------------------------------------------------------------------------------------------------------------

class InMemoryStore:
    """The four fetch methods `export_sessions` needs, over rows shaped like the Atlas database's."""

    def __init__(self, sessions: list, steps: dict, events: dict):
        self.sessions, self.steps, self.events = sessions, steps, events

    async def fetch_sessions(self, limit=50, offset=0):
        return [dict(row) for row in self.sessions[offset:offset + limit]]

    async def fetch_session(self, session_id):
        return next((dict(row) for row in self.sessions if row["id"] == session_id), None)

    async def fetch_session_steps(self, session_id):
        return self.steps.get(session_id, [])

    async def fetch_trajectory_events(self, session_id, limit=200):
        return self.events.get(session_id, [])[:limit]  # newest first, as the database returns them


def _event(event_id: int, actor: str, event_type: str, data: dict) -> dict:
    """A trajectory event row as stored by the SDK (an IntermediateStep dump)."""
    return {"id": event_id, "created_at": datetime(2025, 5, 1, 12, 0, event_id, tzinfo=timezone.utc),
            "event": {"parent_id": "root", "function_ancestry": {"function_name": "step", "function_id": "f"},
                      "payload": {"event_type": event_type, "name": actor, "metadata": {"actor": actor},
                                  "data": data}}}


JUDGE = {"identifier": "accuracy", "score": 0.75, "rationale": "close", "principles": [{"name": "p", "weight": 1}],
         "samples": [{"score": 0.75, "rationale": "r", "principles": [], "uncertainty": 0.1, "temperature": 0.2}],
         "escalated": False, "escalation_reason": None}


def _atlas_store() -> InMemoryStore:
    when = datetime(2025, 5, 1, 12, 0, tzinfo=timezone.utc)
    sessions = [
        {"id": 1, "task": "Compute 17 * 23.", "final_answer": "391", "status": "succeeded",
         "review_status": "approved", "review_notes": " fine ", "created_at": when, "completed_at": when,
         "plan": {"steps": [{"id": 1, "description": "Multiply", "tool": "calculator",
                             "tool_params": {"expression": "17*23"}},
                            {"id": 2, "description": "Report", "depends_on": [1]}]},
         "metadata": {"ground_truth": "391", "execution_mode": "coach", "system_prompt": "Executor prompt v2.",
                      "adaptive_summary": {"adaptive_mode": "coach", "confidence": 0.4,
                                           "probe": {"mode": "coach", "confidence": 0.4, "evidence": ["x"]},
                                           "mode_history": []},
                      "triage_dossier": {"task": "t", "summary": "s", "risks": [], "signals": [], "tags": ["m"]},
                      "learning_key": "math", "teacher_notes": ["note"], "drift": {"drift_alert": False},
                      "sdk_added_field": {"nested": [1, "two"]}},
         "reward": {"score": 0.9, "uncertainty": 0.05, "judges": [JUDGE], "rationale": "good"},
         "student_learning": "check carries", "teacher_learning": "ask for the product first",
         "reward_stats": {"mean": 0.9}, "reward_audit": [{"stage": "session", "score": 0.9}]},
        {"id": 2, "task": "Summarise the report.", "final_answer": "", "status": "failed",
         "review_status": "pending", "created_at": when,
         "plan": {"steps": [{"id": 1, "description": "Read"}]},
         "metadata": {"reward_summary": {"score": 0.2}, "learning_history": {"count": 3}}},
        {"id": 3, "task": "Say hello.", "final_answer": "hello", "status": "succeeded", "review_status": "approved",
         "created_at": when, "plan": {"steps": []}, "metadata": {}},
    ]
    steps = {
        1: [{"step_id": 1, "trace": "calculator(17*23) -> 391", "output": "391", "attempts": 2,
             "evaluation": {"validation": {"valid": True, "rationale": "ok"},
                            "reward": {"score": 0.75, "judges": [JUDGE], "rationale": "fine"}},
             "metadata": {"deliverable": {"value": 391}, "artifacts": {"file": "a.txt"}, "status": "ok",
                          "runtime": {"ms": 12}, "custom_flag": True},
             "attempt_details": [{"attempt": 1, "evaluation": {"validation": {"valid": False,
                                                                              "guidance": "Use the calculator."}}},
                                 {"attempt": 2, "evaluation": {"validation": {"valid": True}}}],
             "guidance_notes": ["Use the calculator."]},
            {"step_id": 2, "trace": "", "output": "The answer is 391.", "attempts": 1,
             "evaluation": {"validation": {"valid": True}, "reward": {"score": 1.0, "judges": []}},
             "metadata": {"deliverable": "391"}, "guidance_notes": []}],
        2: [{"step_id": 1, "trace": "read", "output": "too short", "attempts": 3,
             "evaluation": {"validation": {"valid": False}, "reward": {"score": 0.1, "judges": []}},
             "metadata": {"deliverable": ["a", "b"]}, "guidance_notes": ["Cover every section.", "Add numbers."]}],
    }
    events = {1: [
        _event(4, "student", "LLM_END", {"output": "The answer is 391."}),
        _event(3, "teacher", "LLM_END", {"output": json.dumps({"valid": False, "guidance": "Use the calculator."})}),
        _event(2, "teacher", "LLM_START", {"input": "the teacher's prompt"}),
        _event(1, "student", "LLM_END", {"output": "17 * 23 is about 400."}),
    ]}
    return InMemoryStore(sessions, steps, events)


@pytest.fixture(scope="module")
def atlas_export(tmp_path_factory) -> Path:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # arc-atlas imports litellm: no price-map fetch
    from atlas.cli.jsonl_writer import export_sessions

    path = tmp_path_factory.mktemp("atlas") / "export.jsonl"
    summary = asyncio.run(export_sessions(_atlas_store(), path, include_all_review_statuses=True))
    assert (summary.sessions, summary.steps) == (3, 3)
    return path


def test_atlas_export_every_field_survives(atlas_export):
    sessions, summary = load_sessions(atlas_export)
    lines = atlas_export.read_text().splitlines()
    assert summary.sessions == len(sessions) == len(lines) == 3
    for parsed, line in zip(sessions, lines):
        assert parsed.to_dict() == json.loads(line)  # nothing dropped, renamed or retyped
    first, second, third = sessions
    assert first.session_reward["judges"][0]["samples"][0]["uncertainty"] == 0.1
    assert first.reward_score == 0.9 and second.reward_score == 0.2 and third.reward_score is None
    assert first.execution_mode == "coach" and first.review_notes == "fine" and first.learning_key == "math"
    assert first.adaptive_summary["probe"]["evidence"] == ["x"] and first.triage_dossier["tags"] == ["m"]
    assert first.session_metadata["sdk_added_field"] == {"nested": [1, "two"]}
    assert first.status == "succeeded" and second.effective_review_status == "pending"
    multiply, report = first.steps
    assert multiply.reward_score == 0.75 and multiply.reward["judges"][0]["identifier"] == "accuracy"
    assert multiply.deliverable == {"value": 391} and report.deliverable == "391"
    assert second.steps[0].deliverable == ["a", "b"]
    assert multiply.extra["custom_flag"] is True  # step metadata copied to the step's top level by the exporter
    assert report.context["prior_results_text"] == {"1": "391"}
    # oldest first; the exporter lifts `actor` only from event.metadata, so SDK events keep it nested
    assert "actor" not in first.events[0]
    actors = [e["event"]["payload"]["metadata"]["actor"] for e in first.events]
    assert actors == ["student", "teacher", "teacher", "student"]


def test_atlas_export_grpo_records(atlas_export):
    import datasets

    examples = load(atlas_export, review_status_filters=[])
    assert len(examples) == 3  # one per step; the step-less session gives none
    multiply = examples[0]
    system, user = multiply.prompt
    assert system == {"role": "system", "content": "Executor prompt v2."}  # recorded in session_metadata
    for expected in ("Compute 17 * 23.", "Step 1: Multiply", "Tool: calculator", '{"expression": "17*23"}',
                     "Guidance so far:\n- Use the calculator.",
                     'Previous validation: {"guidance": "Use the calculator.", "valid": false}'):
        assert expected in user["content"]
    assert "Results of earlier steps:\n[step 1] 391" in examples[1].prompt[1]["content"]
    assert multiply.completion is None and multiply.ground_truth == "391" and examples[2].ground_truth is None
    meta = multiply.metadata
    assert meta["step_output"] == "391" and meta["step_reward_score"] == 0.75 and meta["session_reward_score"] == 0.9
    assert json.loads(meta["step_reward"])["judges"][0]["samples"][0]["temperature"] == 0.2
    assert json.loads(meta["session_triage_dossier"])["summary"] == "s"
    assert meta["source_line"] == 1 and examples[2].metadata["source_line"] == 2 and meta["session_id"] == 1
    assert set(examples[0].metadata) == set(examples[2].metadata)  # union of columns in every record
    table = datasets.Dataset.from_list([e.metadata for e in examples])  # deliverable: object / str / list
    assert table.num_rows == 3 and table["step_deliverable"][1] == '"391"'


def test_atlas_export_sft_target_is_teacher_guidance(atlas_export):
    examples = load(atlas_export, record_type="sft", review_status_filters=[])
    from_events = [e for e in examples if e.metadata["target_source"] == "trajectory_events"]
    from_steps = [e for e in examples if e.metadata["target_source"] == "step_guidance"]
    # session 1: student, teacher (a JSON verdict with guidance), teacher prompt (skipped), student (no record)
    assert len(from_events) == 1
    record = from_events[0]
    assert record.completion == "Use the calculator."
    assert [m["role"] for m in record.prompt] == ["system", "user"]
    assert "Compute 17 * 23." in record.prompt[1]["content"] and "about 400" in record.prompt[1]["content"]
    assert "The answer is 391." not in record.prompt[1]["content"] and "teacher's prompt" not in str(record.prompt)
    # session 2 has no events: one record per guidance note, earlier notes as context
    assert [e.completion for e in from_steps] == ["Cover every section.", "Add numbers."]
    assert "too short" in from_steps[0].prompt[-1]["content"]
    assert "Guidance already given:\n- Cover every section." in from_steps[1].prompt[-1]["content"]
    assert all(e.prompt[-1]["role"] == "user" for e in examples)


# ---------------------------------------------------------------------------------------------------------------------
# Messy files
# ---------------------------------------------------------------------------------------------------------------------

def messy_sessions() -> list[dict]:
    return [
        session("t0", [step(1, deliverable="text", artifacts=None)], review_status="approved"),
        session("t1", [step(1, deliverable={"rows": [1, 2]}, runtime={"ms": 3}),
                       step(2, deliverable=[{"a": 1}, "b"], attempts=2)],
                session_metadata={"status": "succeeded", "drift_alert": True}, drift_alert=True),
        session("t2", [step(1, deliverable=7, reward={"score": 1, "judges": []})], drift_alert="high",
                ground_truth={"answer": 42}, newer_sdk_field={"x": [1, {"y": None}]}),
    ]


def test_mixed_types_and_late_fields_are_arrow_safe(tmp_path):
    import datasets

    raw = messy_sessions()
    with pytest.raises(pyarrow.ArrowException):  # what handing these values straight to Arrow does
        datasets.Dataset.from_list([s for r in raw for s in r["steps"]])
    examples = load(write_jsonl(tmp_path / "messy.jsonl", raw))
    table = datasets.Dataset.from_list([e.metadata for e in examples])
    assert table.num_rows == 4
    assert table["session_newer_sdk_field"] == [None, None, None, '{"x": [1, {"y": null}]}']  # only the last record
    assert table["session_drift_alert"] == [None, "true", "true", '"high"']  # bool / str mixed -> JSON text
    assert table["step_reward_score"] == [0.5, 0.5, 0.5, 1.0]
    assert [e.ground_truth for e in examples] == [None, None, None, '{"answer": 42}']
    assert json.loads(table["step_deliverable"][2]) == [{"a": 1}, "b"]


def test_malformed_line_names_file_and_line(tmp_path, capsys):
    good = session("ok", [step(1)])
    path = write_jsonl(tmp_path / "bad.jsonl", [good, '{"task": "broken", "steps": [', good])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load(path)
    examples = load(path, on_bad_record="skip")
    assert [e.metadata["source_line"] for e in examples] == [1, 3]
    assert "1 bad lines skipped (" in capsys.readouterr().out


@pytest.mark.parametrize("record, message", [
    (session("x", [step("one")]), r"wrong\.jsonl:1: steps\[0\]: field 'step_id': expected an integer, got str"),
    (session("x", [step(1, guidance="not a list")]), r"field 'guidance': expected a list"),
    (session("x", [step(1, reward={"score": "high"})]), r"field 'reward\.score': expected a number"),
    (session(["x"], []), r"wrong\.jsonl:1: field 'task': expected a string"),
    ({"task": "x"}, r"wrong\.jsonl:1: missing required field 'steps'"),
    ([1, 2], r"wrong\.jsonl:1: expected a JSON object"),
])
def test_wrong_types_are_errors(tmp_path, record, message):
    with pytest.raises(ValueError, match=message):
        load(write_jsonl(tmp_path / "wrong.jsonl", [record]))


def test_empty_file_is_a_clear_error(tmp_path):
    for name, text in (("empty.jsonl", ""), ("blank.jsonl", "\n  \n")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=rf"{name}: no sessions found"):
            load(tmp_path / name)
    with pytest.raises(ValueError, match="not found"):
        load(tmp_path / "missing.jsonl")


def test_compressed_input_reads_like_plain(tmp_path):
    records = messy_sessions()
    plain = load(write_jsonl(tmp_path / "export.jsonl", records))
    for name, opener in (("export.jsonl.gz", gzip.open), ("export.jsonl.xz", lzma.open)):
        packed = load(write_jsonl(tmp_path / name, records, opener))
        assert [(e.prompt, e.ground_truth) for e in packed] == [(e.prompt, e.ground_truth) for e in plain]
    truncated = tmp_path / "cut.jsonl.gz"
    truncated.write_bytes((tmp_path / "export.jsonl.gz").read_bytes()[:-20])
    with pytest.raises(ValueError, match=r"cut\.jsonl\.gz:\d+: cannot read compressed data"):
        load(truncated)


def test_older_export_evaluation_field(tmp_path):
    old_step = step(1, validation=None)
    del old_step["reward"], old_step["validation"]
    old_step["evaluation"] = {"reward": {"score": 0.3, "judges": []}, "validation": {"valid": False}}
    bare = step(2)
    bare["evaluation"] = bare.pop("reward") | {"score": 0.6}
    (parsed,), _ = load_sessions(write_jsonl(tmp_path / "old.jsonl", [session("old", [old_step, bare])]))
    assert [s.reward_score for s in parsed.steps] == [0.3, 0.6]
    assert parsed.steps[0].validation == {"valid": False}


def test_filters(tmp_path, capsys):
    records = [
        session("a", [step(1)], session_reward={"score": 0.9, "judges": []}, review_status="approved"),
        session("b", [step(1)], reward_summary={"score": 0.4}, review_status="pending"),
        session("c", [step(1)], session_metadata={"status": "failed"}),  # no review status: kept by default
        session("d", [step(1)], session_reward={"score": 0.6, "judges": []}),
    ]
    path = write_jsonl(tmp_path / "f.jsonl", records)
    tasks = lambda examples: [e.metadata["session_task"] for e in examples]  # noqa: E731
    assert tasks(load(path)) == ["a", "c", "d"]
    assert tasks(load(path, review_status_filters=[])) == ["a", "b", "c", "d"]
    assert tasks(load(path, review_status_filters=["Pending"])) == ["b", "c", "d"]
    assert tasks(load(path, review_status_filters=[], min_reward=0.5)) == ["a", "d"]
    assert tasks(load(path, review_status_filters=[], min_reward=0.3)) == ["a", "b", "d"]  # summary score counts
    assert tasks(load(path, status_filters=["FAILED"])) == ["c"]
    assert "1 by review_status_filters" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no grpo records"):
        load(path, min_reward=0.95)


def test_bad_arguments(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [session("a", [step(1)])])
    with pytest.raises(ValueError, match="record_type"):
        load(path, record_type="dpo")
    with pytest.raises(ValueError, match="on_bad_record"):
        load(path, on_bad_record="ignore")
    with pytest.raises(ValueError, match="status_filters"):
        load(path, status_filters=[1])


# ---------------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    return _load_script("make_tiny_model").build_tiny_tokenizer()


def test_grpo_prompt_renders_with_chat_template(tmp_path, tiny_tokenizer):
    second = step(2, description="Report the total", tool="format", tool_params={"style": "short"},
                  context={"prior_results": {"1": {"output_text": "391"}}, "prior_results_text": {"1": "391"}},
                  guidance=["Say only the number."],
                  metadata={"attempt_history": [{"attempt": 1, "evaluation": {"validation": {"valid": False}}},
                                                {"attempt": 2, "evaluation": {"validation": {"valid": True}}}]})
    path = write_jsonl(tmp_path / "r.jsonl", [session("Compute 17*23", [step(1), second])])
    examples = load(path)
    text = tiny_tokenizer.apply_chat_template(examples[1].prompt, tokenize=False, add_generation_prompt=True)
    assert text == (
        f"<|system|>{DEFAULT_EXECUTOR_SYSTEM_PROMPT}<|end|>"
        "<|user|>Task:\nCompute 17*23\n\nStep 2: Report the total\n\n"
        'Tool: format\nTool parameters: {"style": "short"}\n\n'
        "Results of earlier steps:\n[step 1] 391\n\n"
        "Guidance so far:\n- Say only the number.\n\n"
        'Previous validation: {"valid": false}<|end|><|assistant|>'
    )
    ids = tiny_tokenizer.apply_chat_template(examples[1].prompt, add_generation_prompt=True)
    assert tiny_tokenizer.unk_token_id not in ids  # every character of the prompt is in the vocabulary
    # the config's system_prompt replaces the default, a recorded one wins over both
    assert load(path, system_prompt="Be brief.")[0].prompt[0]["content"] == "Be brief."
    recorded = write_jsonl(tmp_path / "p.jsonl", [session("t", [step(1, metadata={"system_prompt": "Recorded."})])])
    assert load(recorded, system_prompt="Be brief.")[0].prompt[0]["content"] == "Recorded."


def test_sft_events_conversation_alternates_and_ends_on_teacher(tmp_path, tiny_tokenizer):
    events = [
        {"actor": "teacher", "event": {"payload": {"content": '{"steps": [{"id": 1}]}'}}},  # plan review: no guidance
        {"actor": "student", "payload": {"message": "Draft one."}},
        {"actor": "student", "payload": {"message": "Draft two."}},
        {"actor": "teacher", "payload": {"guidance": "Shorter, please."}},
        {"actor": "system", "payload": {"text": "retry"}},
        {"actor": "student", "payload": {"message": {"content": "Draft three."}}},
        {"actor": "teacher", "type": "SPAN_START", "payload": {"text": "starting review"}},  # start/stream
        {"actor": "teacher", "event": {"event_type": "LLM_NEW_TOKEN", "data": {"chunk": "Go", "text": "Go"}}},
        {"actor": "teacher", "payload": {"text": "Good."}},
        {"actor": "student", "payload": {"message": "Final."}},  # nothing answers it: no record
    ]
    path = write_jsonl(tmp_path / "e.jsonl", [session("Write a title", [step(1)], trajectory_events=events)])
    examples = load(path, record_type="sft")
    assert [e.completion for e in examples] == ["Shorter, please.", "Good."]
    last = examples[-1]
    assert [m["role"] for m in last.prompt] == ["system", "user", "assistant", "user"]
    assert "Draft one.\n\nStudent:\nDraft two." in last.prompt[1]["content"]
    assert last.prompt[3]["content"] == "Student:\nDraft three."
    text = tiny_tokenizer.apply_chat_template(last.prompt + [{"role": "assistant", "content": last.completion}],
                                              tokenize=False)
    assert text.endswith("<|assistant|>Good.<|end|>")
    none = write_jsonl(tmp_path / "n.jsonl", [session("No teacher", [step(1)])])
    with pytest.raises(ValueError, match="no sft records"):
        load(none, record_type="sft")


# ---------------------------------------------------------------------------------------------------------------------
# Wiring: presets, common/data.py, inspect script
# ---------------------------------------------------------------------------------------------------------------------

def test_presets_load_through_common_data(tmp_path, monkeypatch, atlas_export):
    import yaml

    from common.data import load_examples

    monkeypatch.chdir(tmp_path)  # dataset_path is relative to the working directory
    (tmp_path / "traces").mkdir()
    (tmp_path / "traces" / "export.jsonl").write_bytes(atlas_export.read_bytes())
    counts = {}
    for name in ("runtime_traces", "runtime_traces_sft"):
        preset = yaml.safe_load((REPO_ROOT / "configs" / "data" / f"{name}.yaml").read_text())
        assert preset["dataset_path"] == "traces/export.jsonl" and preset["shuffle"] is True
        cfg = DataArgs(**preset)
        counts[name] = len(load_examples(cfg))
    assert counts == {"runtime_traces": 2, "runtime_traces_sft": 1}  # default filters keep approved sessions


def test_inspect_script(atlas_export, tmp_path, tiny_tokenizer, capsys):
    tiny_tokenizer.save_pretrained(tmp_path / "tok")
    inspect = _load_script("inspect_traces")
    assert inspect.main([str(atlas_export), "--tokenizer", str(tmp_path / "tok")]) == 0
    out = capsys.readouterr().out
    assert "sessions: 3   steps: 3" in out
    assert "session reward: 2 of 3 recorded" in out and "step reward: 3 of 3 recorded" in out
    assert "2 sessions -> 2 grpo records, 1 sft records" in out
    assert "<|system|>Executor prompt v2.<|end|><|user|>Task:\nCompute 17 * 23." in out
    inspect.main([str(atlas_export)])
    assert '"role": "system"' in capsys.readouterr().out
