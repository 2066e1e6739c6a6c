"""Data loading, completion-only masks, packing isolation, and bad-input errors."""
from __future__ import annotations

import gzip
import json
from types import SimpleNamespace

import pytest
import torch

from common.args import CommonArgs
from common.data import (IGNORE_INDEX, Example, collate_sft, load_examples, load_train_eval, make_arithmetic_dataset,
                         pack_examples, split_examples, tokenize_example)
from train_sft import sft_loss_sum


def data_cfg(**overrides) -> CommonArgs:
    cfg = CommonArgs(model_name_or_path="m")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
        for line in raw_lines:
            handle.write(line + "\n")
    return path


def test_completion_only_mask_selects_exactly_the_completion(tiny_tokenizer):
    example = Example(prompt=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "12+34="}],
                      completion="46")
    row = tokenize_example(example, tiny_tokenizer, max_seq_length=128, completion_only=True)
    selected = [t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE_INDEX]
    expected = tiny_tokenizer("46", add_special_tokens=False).input_ids + [tiny_tokenizer.eos_token_id]
    assert selected == expected
    full = tokenize_example(example, tiny_tokenizer, max_seq_length=128, completion_only=False)
    assert full["labels"] == full["input_ids"]


def test_truncation_to_max_seq_length(tiny_tokenizer):
    example = Example(prompt=[{"role": "user", "content": "x" * 50}], completion="y" * 50)
    row = tokenize_example(example, tiny_tokenizer, max_seq_length=40)
    assert len(row["input_ids"]) == 40 and len(row["labels"]) == 40


def test_packing_never_attends_across_documents(tiny_model_dir, tiny_tokenizer):
    """The loss of a packed row equals the token-weighted loss of its documents run separately."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    docs = [Example(prompt=[{"role": "user", "content": q}], completion=a)
            for q, a in (("1+1=", "2"), ("what is 17+25? think", "42, because 17+25 is 42"), ("9+9=", "18"))]
    rows = [tokenize_example(d, tiny_tokenizer, 256) for d in docs]
    packed = pack_examples(rows, max_seq_length=256)
    assert len(packed) == 1
    with torch.no_grad():
        batch = collate_sft(packed, tiny_tokenizer.pad_token_id)
        assert "attention_mask" not in batch
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        packed_nll, packed_tokens, _ = sft_loss_sum(logits, batch["labels"])
        separate_nll, separate_tokens = 0.0, 0
        for row in rows:
            single = collate_sft([row], tiny_tokenizer.pad_token_id)
            out = model(input_ids=single["input_ids"], attention_mask=single["attention_mask"], use_cache=False)
            nll, tokens, _ = sft_loss_sum(out.logits, single["labels"])
            separate_nll, separate_tokens = separate_nll + nll, separate_tokens + tokens
    assert int(packed_tokens) == int(separate_tokens)
    assert torch.allclose(packed_nll, separate_nll, atol=1e-4), (packed_nll, separate_nll)
    # and the same row with a plain causal mask (attention crossing documents) gives a different loss
    with torch.no_grad():
        crossing = model(input_ids=batch["input_ids"], use_cache=False).logits
        crossing_nll, _, _ = sft_loss_sum(crossing, batch["labels"])
    assert not torch.allclose(crossing_nll, separate_nll, atol=1e-3)


def test_packing_respects_max_length(tiny_tokenizer):
    rows = [{"input_ids": [1] * n, "labels": [1] * n} for n in (5, 7, 3, 9, 2)]
    packed = pack_examples(rows, max_seq_length=12)
    assert all(len(r["input_ids"]) <= 12 for r in packed)
    assert sum(len(r["input_ids"]) for r in packed) == 26
    assert len(packed) == 3  # best fit: 9+3, 7+5, 2 (a first-come packing needs 4 rows)
    assert sorted(len(r["input_ids"]) for r in packed) == [2, 12, 12]
    assert packed[0]["position_ids"] == list(range(9)) + list(range(3))


def test_jsonl_formats(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], "id": 1},
        {"prompt": "2+2=", "completion": "4", "level": 3},
        {"question": "capital of France?", "answer": "Paris"},
    ])
    examples = load_examples(data_cfg(dataset_id_or_path=str(path)))
    assert examples[0].prompt == [{"role": "user", "content": "hi"}] and examples[0].completion == "hello"
    assert examples[0].metadata == {"id": 1}
    assert examples[1].completion == "4" and examples[1].metadata == {"level": 3}
    assert examples[2].ground_truth == "Paris" and examples[2].completion is None


def test_gzip_and_level_filter(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        for level in (1, 4, 5, "Level 5", None):
            handle.write(json.dumps({"prompt": "q", "completion": "a", "level": level}) + "\n")
    examples = load_examples(data_cfg(dataset_id_or_path=str(path), dataset_level_filter="level_4_5"))
    assert [e.metadata["level"] for e in examples] == [4, 5, "Level 5"]


def test_malformed_jsonl_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a", "completion": "b"}], raw_lines=['{"prompt": "x",'])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: malformed JSON"):
        load_examples(data_cfg(dataset_id_or_path=str(path)))


def test_chat_record_must_end_with_assistant(tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(ValueError, match=r"chat\.jsonl:1: the last message must be the assistant's"):
        load_examples(data_cfg(dataset_id_or_path=str(path)))


def test_no_rows_after_filtering_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "completion": "a", "level": 1}])
    cfg = data_cfg(dataset_id_or_path=str(path), dataset_level_filter="level_5")
    with pytest.raises(ValueError, match="no rows left after loading and filtering"):
        load_train_eval(cfg)


def test_split_is_seeded_and_disjoint():
    cfg = data_cfg(eval_split_ratio=0.1, dataset_max_samples=200, seed=3)
    examples = make_arithmetic_dataset(cfg, num_samples=1000)
    train, evaluation = split_examples(examples, cfg)
    assert len(train) == 180 and len(evaluation) == 20
    again_train, _ = split_examples(make_arithmetic_dataset(cfg, num_samples=1000), cfg)
    assert [e.prompt for e in again_train] == [e.prompt for e in train]
    assert not {e.prompt[0]["content"] for e in train} & {e.prompt[0]["content"] for e in evaluation}


def test_arithmetic_rows_are_correct():
    for example in make_arithmetic_dataset(SimpleNamespace(seed=0), num_samples=50):
        a, b = example.prompt[0]["content"].rstrip("=").split("+")
        assert example.completion == example.ground_truth == str(int(a) + int(b))
