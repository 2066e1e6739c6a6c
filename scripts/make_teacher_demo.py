"""Data for the CPU teacher demo (configs/recipe/quickstart_teacher.yaml), and a check of the two demo models.

The demo's frozen STUDENT, a tiny Llama trained from scratch on its three prompts at once, adds 2-digit numbers
but drops the carry on every problem whose units digits sum to 10 or more (95+17 -> "102"), unless told to carry.
Its prompts are the recipe's templates, each a five-character field, "|", then the question, so the question's
digits sit at one fixed offset before the answer in every prompt (the tiny model finds digits by position):
- baseline ("solve|95+17="): the sum without the units carry;
- diagnostic ("plan |95+17="): its approach, the units-digit sum ("u=12"), which shows whether a carry is due;
- with teaching ("carry|95+17="): hint "carry" -> adds the carry, even when none is due (so a wrong hint hurts);
  "check", "think" and the like -> its baseline answer. Stated numbers are not in its data.
The TEACHER starts from a short SFT that writes `<teaching>carry|check|think</teaching>`, or (10 %) states the
sum ("=112", a leak), at random whatever the problem; GRPO with `teaching_improvement` has to teach it to hint "carry" exactly when the
approach shows a carry.

    python scripts/make_teacher_demo.py data              # writes outputs/teacher_demo/{student,teacher}_sft.jsonl
    python scripts/make_teacher_demo.py check             # held-out behaviour of the two SFT models
    python scripts/make_teacher_demo.py rule-student -- KEY=VALUE...   # teacher GRPO against the exact rule

`rule-student` serves the rule the student is trained to follow (the SFT targets below, exactly) as an
OpenAI-compatible model on 127.0.0.1 and runs the teacher recipe against it (`student_model: litellm:...`): the
teacher's side of the demo measured without the student's SFT error.

Training rows use only problems of the GRPO recipe's training split (the same generator, seed and split as its
data preset), so the eval rows of the teacher run are new to the student and to the teacher.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from types import SimpleNamespace

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

RECIPE = "configs/recipe/quickstart_teacher.yaml"
TEMPLATE_KEYS = ("student_baseline_template", "student_diagnostic_template", "teacher_adaptive_template",
                 "student_with_teaching_template")
# Hints other than "carry" that the student treats as no help. All five characters long, as "carry" is: the tiny
# student finds the question's digits far more easily at one fixed offset (prompt length changes cost it many steps).
NEUTRAL_HINTS = ["check", "think", "steps", "digit", "focus"]
TEACHER_HINTS = ["carry", "check", "think"]


def fill(template: str, **values: str) -> str:
    """Replace `{name}` for the given names only; other braces stay as written."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    return template


def load_recipe(recipe: str) -> dict:
    """The recipe composed with its presets (templates, data and seed as the GRPO run sees them)."""
    from common.config import compose
    merged, _, _ = compose(recipe, [])
    return merged


def split_problems(merged: dict) -> tuple[list, list]:
    """(train, eval) examples exactly as the GRPO run splits them."""
    from common.config import instantiate
    from common.data import split_examples
    keys = ("seed", "shuffle", "dataset_max_samples", "eval_split_ratio", "dataset_path", "dataset_id_or_path",
            "make_dataset_fn", "dataset_level_filter")
    cfg = SimpleNamespace(**{k: merged.get(k) for k in keys})
    examples = instantiate(cfg.make_dataset_fn, cfg, key="make_dataset_fn")
    return split_examples(examples, cfg)


def operands(question: str) -> tuple[int, int]:
    left, right = question.rstrip("=").split("+")
    return int(left), int(right)


def carry_due(a: int, b: int) -> bool:
    return a % 10 + b % 10 >= 10


def dropped(a: int, b: int) -> int:
    return a + b - 10 if carry_due(a, b) else a + b


def student_answer(a: int, b: int, teaching) -> str:
    """What the demo student is trained to answer (teaching None = baseline)."""
    if teaching == "carry":
        return str(a + b if carry_due(a, b) else a + b + 10)
    return str(dropped(a, b))


def approach(a: int, b: int) -> str:
    return f"u={a % 10 + b % 10}"


def user(content: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def write_data(merged: dict, out: Path, seed: int) -> None:
    templates = merged["trainer_args"]
    train, _ = split_problems(merged)
    rng = random.Random(seed)
    student, teacher = [], []
    for example in train:
        question = example.prompt[-1]["content"]
        a, b = operands(question)
        student.append(user(fill(templates["student_baseline_template"], question=question),
                            student_answer(a, b, None)))
        student.append(user(fill(templates["student_diagnostic_template"], question=question), approach(a, b)))
        with_teaching = templates["student_with_teaching_template"]
        student.append(user(fill(with_teaching, question=question, teaching="carry"), student_answer(a, b, "carry")))
        hint = rng.choice(NEUTRAL_HINTS)
        student.append(user(fill(with_teaching, question=question, teaching=hint), student_answer(a, b, hint)))
        # the teacher-init: a hint drawn at random whatever the problem; 10 % state the sum (a leak)
        teaching = f"={a + b}" if rng.random() < 0.1 else rng.choice(TEACHER_HINTS)
        prompt = fill(templates["teacher_adaptive_template"], question=question, approach=approach(a, b))
        teacher.append(user(prompt, f"<teaching>{teaching}</teaching>"))
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("student_sft.jsonl", student), ("teacher_sft.jsonl", teacher)):
        rng.shuffle(rows)
        with open(out / name, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        print(f"wrote {len(rows)} rows to {out / name}")


def generate(model, tokenizer, texts: list[str], max_new_tokens: int, sample: bool = False,
             batch_size: int = 256) -> list[str]:
    import torch
    from common.data import encode_prompt
    outputs = []
    for start in range(0, len(texts), batch_size):
        ids = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts[start:start + batch_size]]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=sample, temperature=1.0 if sample else None, top_k=None, top_p=None,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return outputs


def check(merged: dict, student_path: str, teacher_path: str, samples: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    templates = merged["trainer_args"]
    _, held_out = split_problems(merged)
    questions = [e.prompt[-1]["content"] for e in held_out][:samples]
    pairs = [operands(q) for q in questions]
    carry = [carry_due(a, b) for a, b in pairs]
    truth = [str(a + b) for a, b in pairs]
    print(f"{len(questions)} held-out problems, {100 * sum(carry) / len(carry):.1f} % with a units carry")
    tokenizer = AutoTokenizer.from_pretrained(student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path).eval()

    def accuracy(answers, subset=None):
        rows = [i for i in range(len(answers)) if subset is None or subset[i]]
        return 100 * sum(answers[i].strip() == truth[i] for i in rows) / max(1, len(rows))

    base = generate(student, tokenizer, [fill(templates["student_baseline_template"], question=q)
                                         for q in questions], 6)
    drops = 100 * sum(base[i].strip() == str(dropped(*pairs[i])) for i in range(len(pairs))) / len(pairs)
    print(f"student baseline: accuracy {accuracy(base):.1f} % (where no carry is due "
          f"{accuracy(base, [not c for c in carry]):.1f} %, where one is {accuracy(base, carry):.1f} %); "
          f"answers as trained (carry dropped where due): {drops:.1f} %")
    diag = generate(student, tokenizer, [fill(templates["student_diagnostic_template"], question=q)
                                         for q in questions], 6)
    print(f"student diagnostic: approach as trained {100 * sum(d.strip() == approach(*p) for d, p in zip(diag, pairs)) / len(pairs):.1f} %"
          f" (e.g. {questions[0]!r} -> {diag[0]!r})")
    with_teaching = templates["student_with_teaching_template"]
    cases = {
        "right hint (carry iff due, else check)": ["carry" if c else "check" for c in carry],
        "always carry": ["carry"] * len(pairs),
        "wrong hint (carry iff not due)": ["check" if c else "carry" for c in carry],
        "always think": ["think"] * len(pairs),
        "stated sum (leak)": [f"={t}" for t in truth],
    }
    for name, hints in cases.items():
        answers = generate(student, tokenizer, [fill(with_teaching, question=q, teaching=h)
                                                for q, h in zip(questions, hints)], 6)
        print(f"student with {name}: accuracy {accuracy(answers):.1f} %")
    teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    prompts = [fill(templates["teacher_adaptive_template"], question=q, approach=d) for q, d in zip(questions, diag)]
    for name, sample in (("sampled", True), ("greedy", False)):
        texts = generate(teacher, teacher_tokenizer, prompts, 40, sample=sample)
        counts: dict[str, int] = {}
        for text in texts:
            inner = text.split("<teaching>", 1)[-1].split("</teaching>", 1)[0] if "<teaching>" in text else None
            key = "(no tag)" if inner is None else ("=number" if inner.startswith("=") else inner)
            counts[key] = counts.get(key, 0) + 1
        shares = ", ".join(f"{k}: {100 * v / len(texts):.0f} %" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
        print(f"teacher-init hints ({name}): {shares} (e.g. {texts[0]!r})")


def rule_reply(templates: dict, content: str) -> str:
    """The student's SFT target for a filled student prompt (any of its three templates)."""
    import re

    def pattern(template: str) -> str:
        text = re.escape(template)
        text = text.replace(re.escape("{question}"), r"(?P<question>\d+\+\d+=)", 1)
        text = text.replace(re.escape("{question}"), r"(?P=question)")
        return "^" + text.replace(re.escape("{teaching}"), r"(?P<teaching>.*)") + "$"

    # the two fixed prompts first: "plan |95+17=" also matches the with-teaching template (teaching "plan ")
    for key in ("student_diagnostic_template", "student_baseline_template", "student_with_teaching_template"):
        match = re.match(pattern(templates[key]), content, re.DOTALL)
        if match:
            a, b = operands(match.group("question"))
            if key == "student_diagnostic_template":
                return approach(a, b)
            return student_answer(a, b, match.groupdict().get("teaching"))
    return ""


def run_rule_student(merged: dict, recipe: str, overrides: list[str]) -> int:
    import subprocess
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from openai_stub_server import OpenAIStubServer, StubReply

    templates = merged["trainer_args"]

    def reply(request):
        messages = request.body.get("messages", [])
        return StubReply(content=rule_reply(templates, str(messages[-1].get("content", "")) if messages else ""))

    with OpenAIStubServer(reply=reply) as server:
        command = [sys.executable, str(REPO_ROOT / "train_grpo.py"), "--config", recipe,
                   "student_model=litellm:openai/rule-student", f"student_api_base={server.base_url}",
                   "trainer_log_name=quickstart_teacher_rule_student", *overrides]
        return subprocess.call(command)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["data", "check", "rule-student"])
    parser.add_argument("--recipe", default=RECIPE, help="the teacher GRPO recipe whose templates and data are used")
    parser.add_argument("--output", default="outputs/teacher_demo", help="data directory (mode data)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the hint draws (mode data)")
    parser.add_argument("--student", default="outputs/quickstart_teacher_student")
    parser.add_argument("--teacher", default="outputs/quickstart_teacher_init")
    parser.add_argument("--samples", type=int, default=500, help="held-out problems checked (mode check)")
    parser.add_argument("overrides", nargs="*", help="rule-student: key=value overrides of the teacher recipe")
    args = parser.parse_args()
    merged = load_recipe(args.recipe)
    missing = [k for k in TEMPLATE_KEYS if k not in merged.get("trainer_args", {})]
    if missing:
        print(f"error: {args.recipe}: trainer_args lacks {', '.join(missing)}", file=sys.stderr)
        sys.exit(2)
    if args.mode == "data":
        write_data(merged, Path(args.output), args.seed)
    elif args.mode == "rule-student":
        sys.exit(run_rule_student(merged, args.recipe, args.overrides))
    else:
        check(merged, args.student, args.teacher, args.samples)


if __name__ == "__main__":
    main()
