"""Config composition, overrides, interpolation, validation and batch math; every shipped YAML resolves."""
from __future__ import annotations

import dataclasses
import importlib
import re
import typing
from pathlib import Path

import pytest
import yaml

from common.config import (CONFIG_DIR, ConfigError, compose, config_to_dict, load_config, resolve_batch_sizes,
                           save_config)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_sft", "train_grpo", "train_gkd")


def script_configs() -> dict[str, type]:
    found = {}
    for name in SCRIPTS:
        module = importlib.import_module(name)
        if hasattr(module, "Config"):
            found[name] = module.Config
    return found


def unknown_keys(cls: type, values: dict, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    bad = []
    for key, value in values.items():
        if key not in fields:
            bad.append(prefix + key)
            continue
        nested = [a for a in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):
            bad += unknown_keys(nested[0], value, f"{prefix}{key}.")
    return bad


def recipe_script(path: Path) -> str:
    match = re.search(r"^# launch: (train_\w+)\.py", path.read_text(), re.MULTILINE)
    assert match, f"{path} lacks a '# launch: train_X.py' first line naming its script"
    return match.group(1)


RECIPES = sorted((CONFIG_DIR / "recipe").glob("*.yaml"))
PRESETS = sorted(p for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name not in ("recipe", "reward_system"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_resolves_against_its_script(recipe, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    script = recipe_script(recipe)
    configs = script_configs()
    if script not in configs:
        pytest.fail(f"{recipe} names {script}.py, which has no Config")
    overrides = {"default": ["model_name_or_path=some/model"],
                 # a vLLM-server recipe names its server on the command line
                 "teacher_rcl": ["vllm_host=127.0.0.1", "vllm_port=8000"]}.get(recipe.stem, [])
    cfg = load_config(configs[script], ["--config", str(recipe), *overrides])
    assert cfg.output_dir
    with pytest.raises(SystemExit) as exit_info:   # and as a user sees it: --print-config resolves and exits 0
        load_config(configs[script], ["--config", str(recipe), "--print-config", *overrides])
    assert exit_info.value.code == 0
    assert f"output_dir: {cfg.output_dir}" in capsys.readouterr().out


# Each trainer preset alone, with only the model path(s) its script requires: the spec's defaults must resolve.
# base.yaml is shared by every algorithm, so every script must take it.
TRAINER_PRESET_SCRIPTS = {"base": SCRIPTS, "base_sft": ("train_sft",), "gkd": ("train_gkd",),
                          "grpo": ("train_grpo",), "teacher_grpo": ("train_grpo",)}


def test_every_trainer_preset_is_assigned_a_script():
    assert sorted(TRAINER_PRESET_SCRIPTS) == sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))


@pytest.mark.parametrize("preset,script", [(p, s) for p, scripts in TRAINER_PRESET_SCRIPTS.items() for s in scripts])
def test_every_trainer_preset_resolves_with_only_a_model_path(preset, script, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    model = tmp_path / "model"
    model.mkdir()
    paths = [f"model_name_or_path={model}"] + ([f"teacher_model_name_or_path={model}"] if script == "train_gkd" else [])
    with pytest.raises(SystemExit) as exit_info:
        load_config(script_configs()[script], ["--config", f"configs/trainer/{preset}.yaml", "--print-config", *paths])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    if script == "train_grpo":   # null resolves to a group size that divides the step (spec: 252 -> 7)
        assert printed["num_generations"] == {"base": 8}.get(preset, 7)
        assert printed["train_batch_size"] % printed["num_generations"] == 0


@pytest.mark.parametrize("total,world,expected", [(252, 1, 7), (256, 1, 8), (64, 1, 8), (252, 4, 7), (14, 1, 7),
                                                  (24, 4, 6), (12, 2, 6), (10, 1, 5), (13, 1, None), (8, 8, None)])
def test_num_generations_null_is_the_largest_group_that_divides_the_step(total, world, expected):
    from train_grpo import resolve_num_generations
    if expected is None:
        with pytest.raises(ConfigError, match="key 'num_generations' = null: no group size from 2 to 8"):
            resolve_num_generations(total, world)
    else:
        assert resolve_num_generations(total, world) == expected


def test_grpo_spec_preset_prints_its_resolved_config(tmp_path):
    # the spec's own GRPO preset, launched as the README shows it
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "train_grpo.py", "--config", "configs/trainer/grpo.yaml",
                          f"model_name_or_path={tmp_path}", "--print-config"], cwd=ROOT, capture_output=True,
                         text=True, env={k: v for k, v in __import__("os").environ.items() if k != "WORLD_SIZE"})
    assert run.returncode == 0, run.stderr
    assert "num_generations: 7\n" in run.stdout and "# batch: train_batch_size 252" in run.stdout


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_preset_key_is_known_to_a_script(preset):
    merged, sources = {}, {}
    from common.config import compose_file
    compose_file(preset, merged, sources)
    configs = script_configs()
    verdicts = {name: unknown_keys(cls, merged) for name, cls in configs.items()}
    assert any(not bad for bad in verdicts.values()), f"{preset}: keys unknown to every script: {verdicts}"


def test_every_dataclass_key_with_a_yaml_default_is_typed_consistently():
    # each shipped recipe's values survive type checking (load_config above) and keep their types when saved
    from train_sft import Config
    cfg = load_config(Config, ["--config", "configs/recipe/teacher_sft.yaml"])
    assert cfg.learning_rate == 2e-4 and isinstance(cfg.learning_rate, float)
    assert cfg.max_seq_length == 16384 and cfg.packing is False and cfg.lr_scheduler_type == "constant"
    assert cfg.model_name_or_path == "Qwen/Qwen3-8B" and cfg.tokenizer_name_or_path == "Qwen/Qwen3-8B"
    assert cfg.trust_remote_code is False and cfg.tokenizer.padding_side == "left"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_merge_order_and_overrides(tmp_path, monkeypatch):
    from train_sft import Config
    recipe = write(tmp_path / "r.yaml", "defaults:\n  - model: tiny\n  - trainer: base_sft\n"
                   "learning_rate: 1.0e-3\nlora:\n  r: 4\n")
    cfg = load_config(Config, ["--config", str(recipe), "learning_rate=5e-4", "lora.alpha=7", "report_to=[wandb]",
                               "max_steps=3"])
    assert cfg.learning_rate == 5e-4            # command line beats the file
    assert cfg.lora.r == 4 and cfg.lora.alpha == 7  # nested maps merge
    assert cfg.lora.dropout == 0.05               # untouched nested default from model/base.yaml
    assert cfg.per_device_train_batch_size == 4  # from trainer/base_sft.yaml
    assert cfg.report_to == ["wandb"] and cfg.max_steps == 3


def test_interpolation_and_env(tmp_path, monkeypatch):
    from train_sft import Config
    monkeypatch.setenv("MY_SECRET_DIR", "/secret/place")
    recipe = write(tmp_path / "r.yaml", "defaults:\n  - model: tiny\ntrainer_log_name: exp1\n"
                   "run_name: ${trainer_log_name}-${seed}\nsystem_prompt: ${env:MY_SECRET_DIR}\n")
    cfg = load_config(Config, ["--config", str(recipe)])
    assert cfg.run_name == "exp1-42" and cfg.output_dir == "outputs/exp1"
    assert cfg.system_prompt == "/secret/place"
    saved = save_config(cfg, str(tmp_path / "out"))
    text = saved.read_text()
    assert "/secret/place" not in text and "<from environment>" in text


def test_secret_looking_keys_are_redacted(tmp_path):
    from train_sft import Config
    cfg = load_config(Config, ["model_name_or_path=m", "make_dataset_fn={_target_: x.y, api_key: sk-123, hub_token: t}"])
    data = config_to_dict(cfg)
    assert data["make_dataset_fn"]["api_key"] == "<redacted>" and data["make_dataset_fn"]["hub_token"] == "<redacted>"
    assert "sk-123" not in yaml.safe_dump(data)


def test_unknown_key_names_file_and_suggestion(tmp_path):
    from train_sft import Config
    recipe = write(tmp_path / "typo.yaml", "defaults:\n  - model: tiny\nlearnig_rate: 1.0e-3\n")
    with pytest.raises(ConfigError, match=r"typo\.yaml.*unknown key 'learnig_rate'.*did you mean 'learning_rate'"):
        load_config(Config, ["--config", str(recipe)])
    with pytest.raises(ConfigError, match=r"command line.*unknown key 'lora.rank'"):
        load_config(Config, ["model_name_or_path=m", "lora.rank=3"])


def test_type_errors_name_the_key(tmp_path):
    from train_sft import Config
    with pytest.raises(ConfigError, match=r"'max_steps' = 'many': expected an integer"):
        load_config(Config, ["model_name_or_path=m", "max_steps=many"])
    with pytest.raises(ConfigError, match=r"'lr_scheduler_type' = 'cosnie': expected one of"):
        load_config(Config, ["model_name_or_path=m", "lr_scheduler_type=cosnie"])


def test_missing_files_and_presets(tmp_path):
    from train_sft import Config
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Config, ["--config", str(tmp_path / "nope.yaml")])
    recipe = write(tmp_path / "r.yaml", "defaults:\n  - model: qwen9_999b\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: default 'model: qwen9_999b'.*available in configs/model/"):
        load_config(Config, ["--config", str(recipe)])
    bad = write(tmp_path / "bad.yaml", "a: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+: invalid YAML"):
        load_config(Config, ["--config", str(bad)])


def test_missing_interpolation_target(tmp_path):
    from train_sft import Config
    recipe = write(tmp_path / "r.yaml", "model_name_or_path: m\nrun_name: ${no_such_key}\n")
    with pytest.raises(ConfigError, match=r"refers to \$\{no_such_key\}"):
        load_config(Config, ["--config", str(recipe)])


class _Batch:
    def __init__(self, total, per_device, accum):
        self.train_batch_size, self.per_device_train_batch_size, self.gradient_accumulation_steps = (
            total, per_device, accum)


@pytest.mark.parametrize("total,per_device,accum,world,expected", [
    (64, 2, None, 1, (64, 2, 32)),
    (64, 2, None, 4, (64, 2, 8)),
    (None, 4, 2, 2, (16, 4, 2)),
    (48, None, 3, 2, (48, 8, 3)),
    (12, 3, 2, 2, (12, 3, 2)),
])
def test_batch_math_any_two_determine_the_third(total, per_device, accum, world, expected):
    batch = _Batch(total, per_device, accum)
    resolve_batch_sizes(batch, world)
    assert (batch.train_batch_size, batch.per_device_train_batch_size, batch.gradient_accumulation_steps) == expected


@pytest.mark.parametrize("total,per_device,accum,world,message", [
    (64, 3, None, 1, "not divisible"),
    (64, 2, 4, 1, r"64 != per_device_train_batch_size 2 x gradient_accumulation_steps 4"),
    (None, None, 4, 1, "at least two"),
    (10, None, 3, 1, "not divisible"),
    (64, 0, None, 1, ">= 1"),
])
def test_batch_math_errors(total, per_device, accum, world, message):
    with pytest.raises(ConfigError, match=message):
        resolve_batch_sizes(_Batch(total, per_device, accum), world)


def test_batch_math_counts_processes(monkeypatch):
    from train_sft import Config
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = load_config(Config, ["model_name_or_path=m", "train_batch_size=64", "per_device_train_batch_size=4"])
    assert cfg.gradient_accumulation_steps == 4


def test_print_config_exits_without_loading(tmp_path, capsys):
    from train_sft import Config
    with pytest.raises(SystemExit) as exit_info:
        load_config(Config, ["--config", "configs/recipe/teacher_sft.yaml", "--print-config",
                             f"output_dir={tmp_path / 'out'}"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.0002" in out and "# batch: train_batch_size 16" in out
    assert not (tmp_path / "out").exists()


def test_target_instantiation_errors():
    from common.config import import_target
    with pytest.raises(ConfigError, match="cannot import module"):
        import_target("no_such_module.fn", "make_dataset_fn._target_")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        import_target("common.data.nope", "make_dataset_fn._target_")
    assert import_target("common.data.make_arithmetic_dataset").__name__ == "make_arithmetic_dataset"


def test_compose_records_sources():
    merged, sources, _ = compose(str(CONFIG_DIR / "recipe" / "teacher_sft.yaml"), ["seed=7"])
    assert sources["seed"] == "the command line"
    assert sources["max_seq_length"].endswith("recipe/teacher_sft.yaml")
    assert sources["torch_dtype"].endswith("model/qwen3_8b.yaml")


# Defaults live in the dataclasses; a trainer preset restates the spec's values for a reader of the YAML. Each value
# a preset sets equals the default of the dataclass it restates, or is an intended override listed here with why.
PRESET_DATACLASSES = {"base": "common.args.CommonArgs", "base_sft": "train_sft.Config", "gkd": "train_gkd.Config",
                      "grpo": "train_grpo.Config", "teacher_grpo": "train_grpo.Config"}
INTENDED_OVERRIDES = {
    ("teacher_grpo", "trainer_log_name"): "names the run after its reward preset (interpolated)",
    ("teacher_grpo", "completion_only_training"): "episodes are built from the question alone, not a dataset target",
    ("teacher_grpo", "trainer_args.max_probe_tokens"): "interpolates the reward preset's max_probe_tokens",
}


def dataclass_default(cls: type, name: str):
    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None if field.default is dataclasses.MISSING else field.default


def preset_vs_defaults(preset: str, cls: type, values: dict, prefix: str = "") -> list[tuple]:
    hints, drift = typing.get_type_hints(cls), []
    for key, value in values.items():
        nested = [a for a in (hints[key], *typing.get_args(hints[key])) if dataclasses.is_dataclass(a)]
        if nested and isinstance(value, dict):
            drift += preset_vs_defaults(preset, nested[0], value, f"{prefix}{key}.")
            continue
        default = dataclass_default(cls, key)
        if (preset, prefix + key) in INTENDED_OVERRIDES:
            assert value != default, f"{preset}.yaml {prefix}{key} is listed as an override but equals the default"
        elif value != (dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default):
            drift.append((prefix + key, value, default))
    return drift


def test_trainer_presets_restate_their_dataclass_defaults():
    assert sorted(PRESET_DATACLASSES) == sorted(p.stem for p in (CONFIG_DIR / "trainer").glob("*.yaml"))
    drift = {}
    for preset, target in PRESET_DATACLASSES.items():
        module, _, name = target.rpartition(".")
        values = yaml.safe_load((CONFIG_DIR / "trainer" / f"{preset}.yaml").read_text())
        values.pop("defaults", None)
        found = preset_vs_defaults(preset, getattr(importlib.import_module(module), name), values)
        if found:
            drift[preset] = found
    assert not drift, f"preset value != dataclass default (key, preset, default); fix one or list it: {drift}"
    for preset, key in INTENDED_OVERRIDES:   # a stale entry fails too
        node = yaml.safe_load((CONFIG_DIR / "trainer" / f"{preset}.yaml").read_text())
        for part in key.split("."):
            node = node[part]


def test_readme_layout_names_every_module_and_script():
    text = (ROOT / "README.md").read_text()
    layout = text[text.index("## Layout"):]
    layout = layout[:layout.index("\n## ", 1)]
    named = set(re.findall(r"[\w.-]+\.(?:py|sh)\b", layout))
    files = [p for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py"]
    files += [*(ROOT / "scripts").iterdir(), *ROOT.glob("*.py")]
    missing = sorted(p.name for p in files if p.name not in named)
    assert not missing, f"README.md's layout section does not name {missing}"
    folders = set(re.findall(r"^([\w.]+/)", layout, re.MULTILINE))
    assert {"common/", "configs/", "accelerate_configs/", "scripts/", "slurm/", "bench/", "tests/", ".ci/"} <= folders


# The README's key tables restate defaults too: each `key` | value cell (several keys: values split alike) equals
# what the section's trainer preset sets, else the dataclass default. Prose cells ("spec values") are not compared.
README_TABLES = {"## GRPO (`train_grpo.py`)": ("train_grpo", "grpo"), "## Teacher GRPO": ("train_grpo", "teacher_grpo"),
                 "## GKD (`train_gkd.py`)": ("train_gkd", "gkd")}


def readme_table_values(head: str):
    text = (ROOT / "README.md").read_text()
    part = text[text.index(head):]
    for line in part[:part.index("\n## ", 1)].splitlines():
        row = re.match(r"^\| (`[^|]*) \| ([^|]*) \|", line)
        if not row:
            continue
        keys, values = ([c.strip() for c in cell.split(" / " if " / " in cell else ",")] for cell in row.groups())
        if len(keys) != len(values) or not all(re.fullmatch(r"`[\w.]+`", k) for k in keys):
            continue
        prefix = keys[0].strip("`").rpartition(".")[0]   # `trainer_args.a`, `b`: b is trainer_args.b
        for key, value in zip(keys, values):
            key = key.strip("`")
            if "${" not in value and value not in ("required", "the spec's, verbatim"):
                try:
                    parsed = yaml.safe_load(value.strip("`"))
                except yaml.YAMLError:
                    continue
                yield (f"{prefix}.{key}" if prefix and "." not in key else key), parsed


def resolved_default(cls: type, merged: dict, dotted: str):
    node: typing.Any = merged
    for part in dotted.split("."):
        if not (isinstance(node, dict) and part in node):
            break
        node = node[part]
    else:
        return node
    for part in dotted.split("."):
        value = dataclass_default(cls, part)
        hint = typing.get_type_hints(cls)[part]
        cls = next((a for a in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(a)), None)
    return value


def test_readme_key_tables_match_presets_and_defaults():
    compared, drift = 0, []
    for head, (script, preset) in README_TABLES.items():
        cls = script_configs()[script]
        merged, _, _ = compose(f"configs/trainer/{preset}.yaml", [])
        for key, value in readme_table_values(head):
            compared += 1
            expected = resolved_default(cls, merged, key)
            if value != expected:
                drift.append((head, key, value, expected))
    assert not drift, f"README table value != preset / dataclass default (section, key, README, code): {drift}"
    assert compared >= 40, compared
