"""The arithmetic generator's band options: which problems are kept, and which demonstrations drop the carry."""
from types import SimpleNamespace

import pytest

from common.data import make_arithmetic_dataset


def operands(example) -> tuple[int, int]:
    a, b = example.prompt[0]["content"].rstrip("=").split("+")
    return int(a), int(b)


def in_band(example) -> bool:
    return any(90 <= x <= 99 for x in operands(example))


def test_band_only_and_exclude_partition_the_problems():
    cfg = SimpleNamespace(seed=0)
    only = make_arithmetic_dataset(cfg, band=[90, 99], band_problems="only")
    excluded = make_arithmetic_dataset(cfg, band=[90, 99], band_problems="exclude")
    assert len(only) == 100 * 100 - 90 * 90 and all(in_band(e) for e in only)
    assert len(excluded) == 90 * 90 and not any(in_band(e) for e in excluded)


def test_dropped_carry_changes_only_band_demonstrations_with_a_carry():
    examples = make_arithmetic_dataset(SimpleNamespace(seed=0), band=[90, 99], band_dropped_carry_rate=0.7)
    wrong = [e for e in examples if e.completion != e.ground_truth]
    assert all(sum(operands(e)) == int(e.ground_truth) for e in examples)
    assert all(in_band(e) and int(e.completion) == int(e.ground_truth) - 10 for e in wrong)
    band_carries = [e for e in examples if in_band(e) and sum(x % 10 for x in operands(e)) >= 10]
    assert 0.6 < len(wrong) / len(band_carries) < 0.8


def test_default_is_unchanged_by_the_band_options():
    cfg = SimpleNamespace(seed=3)
    plain = make_arithmetic_dataset(cfg, num_samples=200)
    banded = make_arithmetic_dataset(cfg, num_samples=200, band=[90, 99])
    assert [e.prompt for e in plain] == [e.prompt for e in banded]
    assert all(e.completion == e.ground_truth for e in plain + banded)


def test_band_options_without_a_band_are_an_error():
    with pytest.raises(ValueError, match="band"):
        make_arithmetic_dataset(SimpleNamespace(seed=0), band_problems="only")
