"""Every ranged key of every script, out of range on each side (and NaN / inf), is one `error:` line naming the key,
exit status 2, before anything loads and with output_dir untouched. The table is the scripts' own RANGES."""
from __future__ import annotations

import importlib
import math
import typing

import pytest
import torch

from common.config import class_ranges, parse_range
from conftest import run_python

SCRIPTS = {"sft": "train_sft", "grpo": "train_grpo", "gkd": "train_gkd"}


def base_args(script: str, model) -> list[str]:
    recipe = f"configs/recipe/quickstart_{script}.yaml"
    extra = [f"teacher_model_name_or_path={model}"] if script == "gkd" else []
    return ["--config", recipe, f"model_name_or_path={model}", *extra]


def _is_int(cls, key: str) -> bool:
    tp: typing.Any = cls
    for part in key.split("."):
        tp = typing.get_type_hints(tp)[part]
        tp = next((a for a in (tp, *typing.get_args(tp)) if a is not type(None) and a is not None), tp)
    args = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
    return int in args


def _yaml(value: float, is_int: bool) -> str:
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    return str(int(value)) if is_int else repr(value)


def bad_values(text: str, is_int: bool) -> list[float]:
    low, high, low_closed, high_closed, _ = parse_range(text)
    values = []
    if math.isfinite(low):
        values.append(low - 1 if low_closed else low)
    if math.isfinite(high):
        values.append(high + 1 if high_closed else high)
    elif not is_int:
        values.append(math.inf)
    if not is_int:
        values.append(math.nan)
    return values


def cases():
    for script, module in SCRIPTS.items():
        cls = importlib.import_module(module).Config
        for key, text in class_ranges(cls).items():
            is_int = _is_int(cls, key)
            list_typed = "list" in str(typing.get_type_hints(cls).get(key, ""))
            condition = parse_range(text)[4]
            for value in bad_values(text, is_int):
                shown = _yaml(value, is_int)
                overrides = [f"{key}=[{shown}]" if list_typed else f"{key}={shown}"]
                overrides += [f"{condition}=true"] if condition else []
                yield pytest.param(script, key, overrides, id=f"{script}-{key}={shown}")


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_the_base_arguments_are_valid(script, tiny_model_dir, tmp_path, capsys):
    main = importlib.import_module(SCRIPTS[script]).main
    with pytest.raises(SystemExit) as exit_info:
        main([*base_args(script, tiny_model_dir), f"output_dir={tmp_path / 'out'}", "--print-config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script,key,overrides", list(cases()))
def test_every_ranged_key_out_of_range_is_one_error_line(script, key, overrides, tiny_model_dir, tmp_path, capsys):
    main = importlib.import_module(SCRIPTS[script]).main
    with pytest.raises(SystemExit) as exit_info:
        main([*base_args(script, tiny_model_dir), f"output_dir={tmp_path / 'out'}", *overrides, "--print-config"])
    captured = capsys.readouterr()
    assert exit_info.value.code == 2
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: the command line: ") and f"key '{key}' = " in lines[0] \
        and "expected " in lines[0], captured.err
    assert not captured.out
    assert not (tmp_path / "out").exists()


def test_every_script_has_ranges_for_its_numeric_keys():
    """A numeric key without a range must be one whose every value is meaningful."""
    unranged_ok = {"num_generations", "lmbda", "beta"}  # checked in validate() with their own messages
    for module in SCRIPTS.values():
        cls = importlib.import_module(module).Config
        ranged = class_ranges(cls)
        for name, tp in typing.get_type_hints(cls).items():
            args = [a for a in (tp, *typing.get_args(tp)) if a in (int, float)]
            if args and name not in ranged and name not in unranged_ok:
                pytest.fail(f"{module}.Config.{name} is numeric but has no range")


@pytest.mark.parametrize("script,override", [("sft", "learning_rate=-1"), ("grpo", "top_p=2"),
                                             ("gkd", "per_device_eval_batch_size=0")])
def test_a_real_process_exits_2(script, override, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    result = run_python([f"{SCRIPTS[script]}.py", *base_args(script, tiny_model_dir), f"output_dir={out}", override])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the command line: key '{override.split('=')[0]}'")
    assert not out.exists()


def test_max_grad_norm_zero_means_no_clipping():
    """HF users write max_grad_norm=0 for "no clipping": the step equals an unclipped one, the norm is measured."""
    from accelerate import Accelerator

    from common.loop import NonFiniteCounter, optimizer_step

    def one_step(max_grad_norm: float):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        accelerator = Accelerator(cpu=True)
        model, optimizer = accelerator.prepare(model, optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        loss = (model(torch.ones(2, 4)) * 100).sum()
        accelerator.backward(loss)
        norm = optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm, loss, NonFiniteCounter(), 1)
        return norm, [p.detach().clone() for p in model.parameters()]

    norm_off, weights_off = one_step(0.0)
    norm_huge, weights_huge = one_step(1e12)
    norm_clipped, weights_clipped = one_step(1.0)
    assert norm_off == pytest.approx(norm_huge) and norm_off > 1.0
    assert all(torch.equal(a, b) for a, b in zip(weights_off, weights_huge))
    assert not all(torch.equal(a, b) for a, b in zip(weights_off, weights_clipped))
