"""Verifiable rewards on real completions; answer leaks; registry; combining rewards."""
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from common.rewards import (
    REWARD_REGISTRY,
    RewardInput,
    answer_leaked,
    combine_rewards,
    extract_final_answer,
    get_reward_factory,
    make_arithmetic_reward,
    make_exact_match_reward,
    make_format_reward,
    make_math_verify_reward,
)


def batch(*pairs):
    return [RewardInput(prompt="Q", completion=completion, ground_truth=truth) for completion, truth in pairs]


MATH_CASES = [
    ("So the probability is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
    ("<answer>0.5</answer>", "\\frac{1}{2}", 1.0),
    ("First 2, then 5, so the total is 12", "12", 1.0),  # last number
    ("\\boxed{\\sqrt{8}}", "2\\sqrt{2}", 1.0),
    ("\\boxed{3}", "4", 0.0),
    ("The answer is \\boxed{\\frac{1}{", "0.5", 0.0),  # unbalanced brace: falls back to the last number "1"
    ("\\boxed{}", "0.5", 0.0),
    ("I have no idea.", "7", 0.0),
    ("\\boxed{x^2 + 2x + 1}", "(x+1)^2", 1.0),
    ("\\boxed{0.5}", None, None),
]


def test_math_verify_reward_main_thread():
    reward = make_math_verify_reward(None)
    assert reward(batch(*[(c, t) for c, t, _ in MATH_CASES])) == [want for _, _, want in MATH_CASES]


def test_math_verify_reward_from_worker_thread():
    reward = make_math_verify_reward(SimpleNamespace(math_verify_timeout=3))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda case: reward(batch(case[:2]))[0], MATH_CASES))
    assert results == [want for _, _, want in MATH_CASES]


def test_extract_final_answer():
    assert extract_final_answer("a \\boxed{1} then \\boxed{\\frac{2}{3}}") == "\\frac{2}{3}"
    assert extract_final_answer("<answer> 42 </answer> and 7") == "42"
    assert extract_final_answer("<answer>so \\boxed{5}</answer>") == "5"
    assert extract_final_answer("we get 1,234.5 apples") == "1,234.5"
    assert extract_final_answer("no numbers") is None


def test_exact_match_reward():
    reward = make_exact_match_reward(None)
    got = reward(batch(("  PARIS. ", "Paris"), ("\\boxed{\\text{Paris}}", "paris"), ("Lyon", "Paris"),
                       ("so it is 12", "12"), ("twelve", "12"), ("Paris", None)))
    assert got == [1.0, 1.0, 0.0, 1.0, 0.0, None]


def test_format_reward_presets_and_custom_pattern():
    default = make_format_reward(None)
    completions = [
        "<thinking>add</thinking>\n<answer>4</answer>",
        "<thinking>add</thinking> 4",
        "<answer>4</answer><thinking>x</thinking>",
        "<thinking></thinking><answer>4</answer>",  # empty sections do not count
    ]
    assert default(batch(*[(c, None) for c in completions])) == [1.0, 0.0, 0.0, 0.0]

    teaching = make_format_reward(SimpleNamespace(format_pattern="thinking_teaching"))
    assert teaching(batch(("<thinking>gap in units</thinking>\n<teaching>Line up the digits.</teaching>", None),
                          ("<teaching>x</teaching>", None))) == [1.0, 0.0]

    custom = make_format_reward(SimpleNamespace(format_pattern=r"Answer: \d+"))
    assert custom(batch(("Answer: 12", None), ("Answer: 12 apples", None))) == [1.0, 0.0]


def test_format_reward_bad_pattern_names_key():
    with pytest.raises(ValueError, match="format_pattern.*thinking_answer"):
        make_format_reward(SimpleNamespace(format_pattern="<answer>(unclosed"))


def test_arithmetic_reward():
    reward = make_arithmetic_reward(None)
    cases = [("46", 1.0), (" 46\n12+3=15", 1.0), ("46.", 1.0), ("= 46", 1.0), ("466", 0.0), ("46.0", 0.0),
             ("46abc", 0.0), ("4 6", 0.0), ("", 0.0), ("forty-six", 0.0), ("-46", 0.0)]
    assert reward(batch(*[(c, "46") for c, _ in cases])) == [want for _, want in cases]
    assert reward(batch(("-3", "-3"), ("7", None))) == [1.0, None]
    with pytest.raises(ValueError, match="sample 0 has ground_truth '4.5'"):
        reward(batch(("4", "4.5")))


@pytest.mark.parametrize(
    "text, truth, leaked",
    [
        ("The answer is 12.", "12", True),
        ("Try step 12 first, then check.", "12", False),
        ("So x = 4", "4", True),
        ("the result is $\\frac{1}{2}$.", "0.5", True),
        ("Write it as \\boxed{0.5}", "\\frac{1}{2}", True),
        ("Think about the capital of France.", "Paris", False),
        ("It's Paris, of course", "Paris", True),
        ("Consider splitting 144 into 12*12", "144", True),
        ("Add the units first, carry the tens.", "57", False),
        ("<answer>57</answer>", "57", True),
        ("The answer is 13.", "12", False),
        ("", "12", False),
        ("answer is 5", "", False),
    ],
)
def test_answer_leaked(text, truth, leaked):
    assert answer_leaked(text, truth) is leaked


def test_answer_leaked_from_worker_thread():
    with ThreadPoolExecutor(max_workers=1) as pool:
        assert pool.submit(answer_leaked, "so the answer is \\frac{1}{2}", "0.5").result() is True


def test_registry_lists_names_and_resolves():
    for name in ("math_verify", "exact_match", "format", "arithmetic"):
        assert name in REWARD_REGISTRY
    assert get_reward_factory("arithmetic") is make_arithmetic_reward
    with pytest.raises(ValueError, match="unknown reward function 'exactmatch'.*arithmetic, exact_match, format"):
        get_reward_factory("exactmatch")


def test_combine_rewards():
    per_function = [[1.0, None, None, 0.0], [0.5, 1.0, None, 0.0]]
    assert combine_rewards(per_function) == [1.5, 1.0, None, 0.0]
    # weights of missing rewards are not renormalised onto the others
    assert combine_rewards(per_function, [2.0, 0.5]) == [2.25, 0.5, None, 0.0]
    with pytest.raises(ValueError, match="`reward_weights` has 1 entries but there are 2"):
        combine_rewards(per_function, [1.0])
    with pytest.raises(ValueError, match="reward function 1 returned 1 values for 4 samples"):
        combine_rewards([[1.0] * 4, [1.0]])


def test_weighted_rewards_on_tensors_equal_combine_rewards():
    """The training loop weights [N, F] tensors (NaN = None); the numbers are combine_rewards' exactly."""
    import math
    import random

    import torch

    from common.rewards import weighted_rewards

    rng = random.Random(0)
    columns = [[rng.choice([None, 0.0, 1.0, rng.uniform(-2, 2)]) for _ in range(50)] for _ in range(3)]
    weights = [0.7, 1.3, -0.25]
    tensor = torch.tensor([[math.nan if v is None else v for v in column] for column in columns]).T   # [N, F]
    for w in (None, weights):
        expected = combine_rewards([[None if v is None else float(torch.tensor(v, dtype=torch.float32)) for v in c]
                                    for c in columns], w)
        found = weighted_rewards(tensor, w).tolist()
        assert [None if math.isnan(v) else v for v in found] == \
            [None if e is None else float(torch.tensor(e, dtype=torch.float32)) for e in expected]
    assert math.isnan(weighted_rewards(torch.full((1, 3), math.nan), weights)[0])
