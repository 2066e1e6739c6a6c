"""The CPU teacher demo's data (scripts/make_teacher_demo.py data): well-formed rows from the recipe's templates."""
from __future__ import annotations

import json
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import make_teacher_demo as demo  # noqa: E402


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_demo_data_follows_the_students_rule_on_training_problems_only(tmp_path):
    merged = demo.load_recipe(demo.RECIPE)
    templates = merged["trainer_args"]
    train, held_out = demo.split_problems(merged)
    demo.write_data(merged, tmp_path, seed=0)
    student, teacher = read(tmp_path / "student_sft.jsonl"), read(tmp_path / "teacher_sft.jsonl")
    assert len(student) == 4 * len(train) and len(teacher) == len(train)
    held_out_questions = {e.prompt[-1]["content"] for e in held_out}
    kinds = {"baseline": 0, "plan": 0, "carry": 0, "neutral": 0}
    for row in student:
        (prompt, answer) = (m["content"] for m in row["messages"])
        # every student prompt: a five-character field, "|", the question (one offset for the question's digits)
        field, question = prompt.split("|")
        assert len(field) == 5 and question not in held_out_questions, prompt
        a, b = demo.operands(question)
        assert demo.rule_reply(templates, prompt) == answer, prompt
        if prompt == demo.fill(templates["student_baseline_template"], question=question):
            kinds["baseline"] += 1
            assert answer == str(a + b - 10 * demo.carry_due(a, b))
        elif prompt == demo.fill(templates["student_diagnostic_template"], question=question):
            kinds["plan"] += 1
            assert answer == f"u={a % 10 + b % 10}"
        elif field == "carry":
            kinds["carry"] += 1
            assert answer == str(a + b + 10 * (not demo.carry_due(a, b)))
        else:
            kinds["neutral"] += 1
            assert field in demo.NEUTRAL_HINTS and answer == str(a + b - 10 * demo.carry_due(a, b))
    assert set(kinds.values()) == {len(train)}
    hints = {}
    for row in teacher:
        (prompt, completion) = (m["content"] for m in row["messages"])
        question, approach = prompt.split(" ")
        a, b = demo.operands(question)
        assert approach == demo.approach(a, b) and completion.startswith("<teaching>")
        hint = completion.removeprefix("<teaching>").removesuffix("</teaching>")
        kind = "leak" if hint.startswith("=") else hint
        hints[kind] = hints.get(kind, 0) + 1
        if kind == "leak":
            assert hint == f"={a + b}"
    # random hints whatever the problem, about 10 % state the sum (so the leak cap has something to cap)
    assert set(hints) == {"carry", "check", "think", "leak"}
    assert 0.07 < hints["leak"] / len(teacher) < 0.13
