"""Bad input anywhere before training is one `error:` line naming the file / row / key, exit 2, before any model
loads, and nothing created in output_dir. Run in-process: every case stops before a model is loaded."""
from __future__ import annotations

import importlib
import json

import pytest

SCRIPTS = {"sft": "train_sft", "grpo": "train_grpo", "gkd": "train_gkd"}


def write(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n" if path.suffix == ".jsonl" else json.dumps(rows))
    return str(path)


def cases(tmp):
    good = {"prompt": "1+2=", "completion": "3", "answer": "3"}
    return {
        "missing-model": (["model_name_or_path=./models/no-such-model"], "key 'model_name_or_path' = "
                          "'./models/no-such-model': no such local model directory"),
        "mistyped-dataset-dir": (["make_dataset_fn={}", "dataset_id_or_path=./data/arithmetc"],
                                 "key 'dataset_id_or_path' = './data/arithmetc': no such local file or directory"),
        "json-list-of-non-objects": (["make_dataset_fn={}", f"dataset_id_or_path={write(tmp / 'a.json', [good, 7])}"],
                                     "a.json: item 2 of the list: expected a JSON object, got int"),
        "prompt-is-a-dict": (["make_dataset_fn={}", "dataset_id_or_path=" + write(
            tmp / "b.jsonl", [good, {"prompt": {"text": "1+1="}, "completion": "2"}])],
            "b.jsonl:2: `prompt` must be text or a list of {role, content} messages, got dict"),
        "prompt-is-a-list-of-strings": (["make_dataset_fn={}", "dataset_id_or_path=" + write(
            tmp / "c.jsonl", [{"prompt": ["1+1="], "completion": "2"}])],
            "c.jsonl:1: `prompt` is a list, so it must be chat messages"),
        "unknown-target-keyword": (["make_dataset_fn={_target_: common.data.make_arithmetic_rl_nope}"],
                                   "module 'common.data' has no attribute 'make_arithmetic_rl_nope'"),
        "unexpected-target-keyword": (["make_dataset_fn={_target_: common.data.load_arc_atlas_sft, splitt: x}"],
                                      "key 'make_dataset_fn': common.data.load_arc_atlas_sft cannot be called with "
                                      "['splitt']"),
        "empty-completion": (["make_dataset_fn={}", "dataset_id_or_path=" + write(
            tmp / "d.jsonl", [good, {"prompt": "1+1=", "completion": " "}])],
            "d.jsonl:2: `completion` is empty"),
        "empty-assistant-message": (["make_dataset_fn={}", "dataset_id_or_path=" + write(
            tmp / "e.jsonl", [{"messages": [{"role": "user", "content": "1+1="},
                                            {"role": "assistant", "content": ""}]}])],
            "e.jsonl:1: the assistant message (the training target) is empty"),
        "no-row-fits": (["max_seq_length=3", "max_new_tokens=1"],
                        "keeps a completion token within max_seq_length=3"),
    }


CASES = ["missing-model", "mistyped-dataset-dir", "json-list-of-non-objects", "prompt-is-a-dict",
         "prompt-is-a-list-of-strings", "unknown-target-keyword", "unexpected-target-keyword", "empty-completion",
         "empty-assistant-message", "no-row-fits"]
APPLIES = {  # GRPO reads prompts only: completions and sequence lengths of dataset rows do not concern it
    "empty-completion": ("sft", "gkd"), "empty-assistant-message": ("sft", "gkd"), "no-row-fits": ("sft", "gkd"),
}


@pytest.mark.parametrize("script", list(SCRIPTS))
@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_error_line_and_an_untouched_output_dir(script, case, tiny_model_dir, tmp_path, capsys):
    if script not in APPLIES.get(case, SCRIPTS):
        pytest.skip(f"{case} does not apply to {script}")
    overrides, message = cases(tmp_path)[case]
    base = ["--config", f"configs/recipe/quickstart_{script}.yaml", f"model_name_or_path={tiny_model_dir}",
            f"output_dir={tmp_path / 'out'}", "lmbda=0" if script == "gkd" else "seed=1"]
    if script == "gkd":
        base.append(f"teacher_model_name_or_path={tiny_model_dir}")
    if script != "gkd":
        overrides = [o for o in overrides if not o.startswith("max_new_tokens")]
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(SCRIPTS[script]).main([*base, *overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert exit_info.value.code == 2, err[-2000:]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert not (tmp_path / "out").exists()
