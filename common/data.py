"""Datasets -> `Example` records; splits, filters; tokenization, completion masks, packing.

Sources, by `dataset_id_or_path` / `make_dataset_fn`:
- `make_dataset_fn: {_target_: module.fn, **kwargs}` wins: called as `fn(cfg, **kwargs)` -> list[Example]
  (the synthetic arithmetic task, runtime traces and the Arc-ATLAS loaders are such functions).
- a local `.jsonl` / `.json` file (optionally `.gz` / `.xz`), read here with file:line errors;
- anything else (a local dataset directory or a hub id) through `datasets.load_dataset`.
Rows become `Example`s: chat `messages` (last turn = the assistant target), or prompt/completion columns, with
`ground_truth` from the first present of ground_truth / answer / solution.
"""
from __future__ import annotations

import bisect
import gzip
import json
import lzma
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

IGNORE_INDEX = -100
PROMPT_FIELDS = ("prompt", "problem_text", "question", "input")
COMPLETION_FIELDS = ("completion", "response", "output")
GROUND_TRUTH_FIELDS = ("ground_truth", "answer", "solution")


@dataclass
class Example:
    """One dataset row, whatever the source.

    `prompt` is a list of chat messages ({"role", "content"}) ending before the target turn;
    `completion` is the target assistant text (SFT/GKD), None for RL-only prompts.
    `metadata` holds the source's other columns (JSON-serializable), handed to reward functions.
    """
    prompt: list
    completion: Optional[str] = None
    ground_truth: Optional[str] = None
    metadata: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------

def open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    if path.suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    with open_text(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_number}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {type(record).__name__}")
            yield line_number, record


def _read_json_file(path: Path) -> Iterator[tuple[int, dict]]:
    stem = path.name.removesuffix(".gz").removesuffix(".xz")
    if stem.endswith(".jsonl"):
        yield from read_jsonl(path)
        return
    with open_text(path) as handle:
        try:
            data = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    rows = data if isinstance(data, list) else data.get("data") if isinstance(data, dict) else None
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{\"data\": [...]}})")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: item {index + 1} of the list: expected a JSON object, got {type(row).__name__}")
        yield index + 1, row


def load_rows(cfg) -> Iterator[tuple[str, dict]]:
    """Yield (location, row) from `dataset_id_or_path` for the generic loader."""
    source = cfg.dataset_id_or_path
    if not source:
        raise ValueError("no dataset: set `dataset_id_or_path` (hub id, directory or .jsonl file) or `make_dataset_fn`")
    path = Path(source)
    if path.is_file():
        for line, row in _read_json_file(path):
            yield f"{path}:{line}", row
        return
    if source.endswith((".jsonl", ".json", ".gz", ".xz")):
        raise FileNotFoundError(f"dataset file not found: {source} (key 'dataset_id_or_path')")
    from common.config import is_missing_local_path
    if is_missing_local_path(source):
        raise FileNotFoundError(f"key 'dataset_id_or_path' = {source!r}: no such local file or directory (and not "
                                f"a hub id `org/name`)")
    import datasets  # hub ids and dataset directories

    dataset = datasets.load_dataset(source, name=cfg.dataset_config, split=cfg.dataset_split)
    for index, row in enumerate(dataset):
        yield f"{source}[{cfg.dataset_split}][{index}]", row


def _first_present(row: dict, names: tuple) -> tuple[Optional[str], Any]:
    for name in names:
        if row.get(name) not in (None, ""):
            return name, row[name]
    return None, None


def row_to_example(row: dict, location: str, system_prompt: Optional[str] = None) -> Example:
    """A generic row -> Example. Chat `messages`, or prompt/completion (prompt may itself be messages)."""
    used: set[str] = set()
    if "messages" in row:
        messages = row["messages"]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages)):
            raise ValueError(f"{location}: `messages` must be a non-empty list of {{role, content}} objects")
        if messages[-1].get("role") != "assistant":
            raise ValueError(f"{location}: the last message must be the assistant's (the training target), "
                             f"got role {messages[-1].get('role')!r}")
        prompt, completion = [dict(m) for m in messages[:-1]], str(messages[-1].get("content") or "")
        if not completion.strip():
            raise ValueError(f"{location}: the assistant message (the training target) is empty")
        used.add("messages")
    else:
        prompt_key, prompt_value = _first_present(row, PROMPT_FIELDS)
        if prompt_key is None:
            raise ValueError(f"{location}: no prompt: expected `messages` or one of {', '.join(PROMPT_FIELDS)}; "
                             f"row has {', '.join(sorted(row)) or 'no fields'}")
        if isinstance(prompt_value, list):
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt_value):
                raise ValueError(f"{location}: `{prompt_key}` is a list, so it must be chat messages "
                                 f"({{role, content}} objects); got {prompt_value!r:.80}")
        elif not isinstance(prompt_value, (str, int, float)) or isinstance(prompt_value, bool):
            raise ValueError(f"{location}: `{prompt_key}` must be text or a list of {{role, content}} messages, got "
                             f"{type(prompt_value).__name__}")
        prompt = prompt_value if isinstance(prompt_value, list) else [{"role": "user", "content": str(prompt_value)}]
        completion_key, completion = _first_present(row, COMPLETION_FIELDS)
        blank = [k for k in COMPLETION_FIELDS if isinstance(row.get(k), str) and not row[k].strip()]
        if blank and (completion_key is None or completion_key in blank):
            raise ValueError(f"{location}: `{blank[0]}` is empty (a completion is the training target)")
        if isinstance(completion, list):  # conversational completion: [{"role": "assistant", ...}]
            completion = "".join(str(m.get("content", "")) for m in completion)
        used.update(k for k in (prompt_key, completion_key) if k)
    truth_key, truth = _first_present(row, GROUND_TRUTH_FIELDS)
    if truth_key:
        used.add(truth_key)
    if system_prompt and not (prompt and prompt[0].get("role") == "system"):
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    metadata = {k: v for k, v in row.items() if k not in used}
    return Example(prompt=prompt, completion=None if completion is None else str(completion),
                   ground_truth=None if truth is None else str(truth), metadata=metadata)


def _level_filter(spec: str):
    """`level_4_5` keeps rows whose `level` is 4 or 5 (ints or strings like 'Level 4')."""
    match = re.fullmatch(r"level((?:_\d+)+)", spec.strip())
    if not match:
        raise ValueError(f"key 'dataset_level_filter' = {spec!r}: expected a form like level_4_5")
    wanted = {int(n) for n in match.group(1).strip("_").split("_")}

    def keep(example: Example) -> bool:
        level = example.metadata.get("level")
        digits = re.findall(r"\d+", str(level)) if level is not None else []
        return bool(digits) and int(digits[0]) in wanted
    return keep


def load_examples(cfg) -> list[Example]:
    """All examples of the configured source, before shuffling and splitting."""
    if cfg.make_dataset_fn:
        from common.config import instantiate
        examples = instantiate(cfg.make_dataset_fn, cfg, key="make_dataset_fn")
    else:
        examples = [row_to_example(row, where, cfg.system_prompt) for where, row in load_rows(cfg)]
    if cfg.dataset_level_filter:
        examples = [e for e in examples if _level_filter(cfg.dataset_level_filter)(e)]
    return list(examples)


def split_examples(examples: list[Example], cfg) -> tuple[list[Example], list[Example]]:
    """Shuffle (seeded), cap at dataset_max_samples, hold out eval_split_ratio. Errors on an empty result."""
    source = cfg.dataset_path or cfg.dataset_id_or_path or cfg.make_dataset_fn.get("_target_", "?")
    if not examples:
        raise ValueError(f"dataset {source}: no rows left after loading and filtering "
                         f"(dataset_level_filter={cfg.dataset_level_filter!r})")
    examples = list(examples)
    if cfg.shuffle:
        random.Random(cfg.seed).shuffle(examples)
    if cfg.dataset_max_samples is not None:
        examples = examples[: cfg.dataset_max_samples]
    num_eval = int(round(len(examples) * cfg.eval_split_ratio)) if cfg.eval_split_ratio > 0 else 0
    if cfg.eval_split_ratio > 0 and len(examples) > 1:
        num_eval = max(1, num_eval)
    train, evaluation = examples[num_eval:], examples[:num_eval]
    if not train:
        raise ValueError(f"dataset {source}: no training rows after holding out eval_split_ratio="
                         f"{cfg.eval_split_ratio} of {len(examples)}")
    return train, evaluation


def load_train_eval(cfg) -> tuple[list[Example], list[Example]]:
    return split_examples(load_examples(cfg), cfg)


# ---------------------------------------------------------------------------------------------------------------------
# Built-in sources (make_dataset_fn targets)
# ---------------------------------------------------------------------------------------------------------------------

def make_arithmetic_dataset(cfg, num_samples: int = 10000, max_operand: int = 99, operators: str = "+",
                            band: Optional[list] = None, band_problems: str = "include",
                            band_dropped_carry_rate: float = 0.0, **_: Any) -> list[Example]:
    """Seeded `a+b=` problems; every (a, op, b) appears at most once, so held-out rows are unseen.

    `band: [lo, hi]` marks the problems with an operand in lo..hi. `band_problems` keeps them ("include"),
    drops them ("exclude") or keeps only them ("only"). `band_dropped_carry_rate` makes the completion (the
    demonstration) of that share of the band's `+` problems with a units carry forget the carry (38+45 -> "73");
    `ground_truth` stays correct, so rewards and evals still score the true sum.
    """
    if band_problems not in ("include", "exclude", "only"):
        raise ValueError(f"make_arithmetic_dataset: band_problems={band_problems!r}; expected include, exclude or only")
    if band is None and (band_problems != "include" or band_dropped_carry_rate):
        raise ValueError("make_arithmetic_dataset: band_problems / band_dropped_carry_rate need band: [lo, hi]")
    if band is not None and len(band) != 2:
        raise ValueError(f"make_arithmetic_dataset: band={band!r}; expected [lo, hi]")
    if not 0.0 <= band_dropped_carry_rate <= 1.0:
        raise ValueError(f"make_arithmetic_dataset: band_dropped_carry_rate={band_dropped_carry_rate}; expected 0..1")
    problems = [(a, op, b) for op in operators for a in range(max_operand + 1) for b in range(max_operand + 1)]
    rng = random.Random(cfg.seed)
    rng.shuffle(problems)

    def in_band(a: int, b: int) -> bool:
        return band is not None and (band[0] <= a <= band[1] or band[0] <= b <= band[1])

    if band_problems != "include":
        problems = [p for p in problems if in_band(p[0], p[2]) == (band_problems == "only")]
    examples = []
    for a, op, b in problems[:num_samples]:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
        shown = result
        # one draw per problem (not only band ones), so the rate does not change which problems are drawn
        if rng.random() < band_dropped_carry_rate and op == "+" and in_band(a, b) and a % 10 + b % 10 >= 10:
            shown = result - 10
        examples.append(Example(prompt=[{"role": "user", "content": f"{a}{op}{b}="}], completion=str(shown),
                                ground_truth=str(result), metadata={"task": "arithmetic"}))
    return examples


ARC_ATLAS_SYSTEM_PROMPT = (
    "You are an adaptive teacher. Read the problem, diagnose the student's approach, "
    "and give teaching that helps the student solve it without giving away the answer."
)


def _arc_atlas_rows(cfg, relative_file: str) -> Iterator[tuple[str, dict]]:
    source = cfg.dataset_id_or_path
    local = Path(source) / relative_file if source else None
    if local is not None and local.is_file():
        for line, row in read_jsonl(local):
            yield f"{local}:{line}", row
        return
    if source and Path(source).is_file():
        for line, row in read_jsonl(source):
            yield f"{source}:{line}", row
        return
    import datasets

    dataset = datasets.load_dataset(source, data_files=relative_file, split="train")
    for index, row in enumerate(dataset):
        yield f"{source}/{relative_file}[{index}]", row


def load_arc_atlas_sft(cfg, file: str = "training/sft.jsonl") -> list[Example]:
    """Arc-ATLAS-Teach SFT rows -> system + problem -> 'Student Approach / Teacher Diagnosis / Teacher Teaching'."""
    examples = []
    for where, row in _arc_atlas_rows(cfg, file):
        missing = [k for k in ("problem_text", "student_approach", "teacher_diagnosis", "teacher_teaching")
                   if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{where}: Arc-ATLAS SFT row lacks {', '.join(missing)}")
        target = (f"Student Approach: {row['student_approach']}\n\nTeacher Diagnosis: {row['teacher_diagnosis']}"
                  f"\n\nTeacher Teaching: {row['teacher_teaching']}")
        prompt = [{"role": "system", "content": cfg.system_prompt or ARC_ATLAS_SYSTEM_PROMPT},
                  {"role": "user", "content": row["problem_text"]}]
        metadata = {k: v for k, v in row.items() if k not in ("problem_text",)}
        examples.append(Example(prompt=prompt, completion=target, metadata=metadata))
    return examples


def load_arc_atlas_rl(cfg, file: str = "curriculum/arc_atlas_teach_rl.jsonl") -> list[Example]:
    """Arc-ATLAS-Teach RL rows: question from prompt/problem_text/question/input, answer from ground_truth/answer/solution."""
    return [row_to_example(row, where, cfg.system_prompt) for where, row in _arc_atlas_rows(cfg, file)]


# ---------------------------------------------------------------------------------------------------------------------
# Tokenization, completion masks, packing
# ---------------------------------------------------------------------------------------------------------------------

def render_prompt(tokenizer, messages: list) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, messages: list) -> list[int]:
    return tokenizer(render_prompt(tokenizer, messages), add_special_tokens=False).input_ids


def tokenize_example(example: Example, tokenizer, max_seq_length: int, completion_only: bool = True) -> dict:
    """-> {"input_ids", "labels"}; labels are IGNORE_INDEX outside the completion when completion_only.

    The full conversation is rendered by the chat template; when the rendered prompt is a prefix of it
    (true for ordinary templates) the completion starts there, otherwise prompt and completion are joined.
    """
    if example.completion is None:
        raise ValueError("an SFT example needs a completion (the assistant target)")
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    full_text = tokenizer.apply_chat_template(
        example.prompt + [{"role": "assistant", "content": example.completion}], tokenize=False)
    full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    if full_ids[: len(prompt_ids)] != prompt_ids:
        completion_ids = tokenizer(example.completion, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        full_ids = prompt_ids + completion_ids
    input_ids = full_ids[:max_seq_length]
    labels = list(input_ids)
    if completion_only:
        labels[: min(len(prompt_ids), len(labels))] = [IGNORE_INDEX] * min(len(prompt_ids), len(labels))
    return {"input_ids": input_ids, "labels": labels}


def check_row_lengths(rows: list[dict], max_seq_length: int) -> tuple[int, int]:
    """Tokenized rows against max_seq_length -> (rows cut there, rows left without a target token).

    Raises when no row keeps a target token (every step's loss would be 0)."""
    no_target = sum(1 for r in rows if all(label == IGNORE_INDEX for label in r["labels"][1:]))
    if rows and no_target == len(rows):
        raise ValueError(f"none of the {len(rows)} training rows keeps a completion token within max_seq_length="
                         f"{max_seq_length}: every prompt is that long or longer; raise max_seq_length")
    return sum(1 for r in rows if len(r["input_ids"]) >= max_seq_length), no_target


def pack_examples(tokenized: list[dict], max_seq_length: int) -> list[dict]:
    """Best-fit-decreasing packing into rows of <= max_seq_length tokens (fewer, fuller rows than packing in order).

    Each row carries `position_ids` that restart at 0 for every document: with no attention mask, transformers
    builds a block-diagonal causal mask from them, so no token attends across two documents.
    """
    order = sorted(range(len(tokenized)), key=lambda i: -len(tokenized[i]["input_ids"]))
    rows: list[dict] = []
    free: list[tuple[int, int]] = []  # (tokens still free, row index), sorted: the tightest fit is found by bisect
    for i in order:
        item = tokenized[i]
        length = len(item["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))
        if slot < len(free):
            remaining, row_index = free.pop(slot)
        else:
            rows.append({"input_ids": [], "labels": [], "position_ids": []})
            remaining, row_index = max_seq_length, len(rows) - 1
        row = rows[row_index]
        row["input_ids"] += item["input_ids"]
        # the first label of each document is never predicted from the previous document's last token
        row["labels"] += [IGNORE_INDEX] + item["labels"][1:]
        row["position_ids"] += list(range(length))
        if remaining - length > 0:
            bisect.insort(free, (remaining - length, row_index))
    return rows


def collate_sft(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training. Packed rows (with position_ids) get no attention mask (see pack_examples)."""
    width = max(len(row["input_ids"]) for row in batch)
    packed = "position_ids" in batch[0]
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)       # [B, T]
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)          # [B, T]
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)               # [B, T]
    position_ids = torch.zeros((len(batch), width), dtype=torch.long)                 # [B, T]
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        attention_mask[i, :n] = 1
        position_ids[i, :n] = torch.tensor(row["position_ids"]) if packed else torch.arange(n)
        position_ids[i, n:] = torch.arange(width - n)  # padding forms its own segment
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
