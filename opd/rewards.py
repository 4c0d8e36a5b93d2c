"""Rewards a user chooses (`reward=`): a completion and its row in, a number out.

`final_answer` is the built-in tasks' grader (the last line reads `Final: <answer>`); `boxed`
reads the last `\\boxed{...}` of a math answer (the convention of MATH, DeepSeek-R1, verl's
`math` reward); `exact` compares the whole completion; `none` is pure OPD, which needs no reward
(accuracy metrics are then absent, not 0); `module:function` names a user's callable
`(completion: str, example: Example) -> float`. One reward feeds `task/reward`, the GRPO mix,
held-out accuracy and the off-policy baseline alike.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable

from opd.tasks.base import Example, grade, normalize_answer

Reward = Callable[[str, Example], float]
BUILT_IN = ("final_answer", "boxed", "exact", "none")
NEEDS_ANSWER = ("final_answer", "boxed", "exact")  # built-ins that compare against the row's answer


def final_answer(completion: str, example: Example) -> float:
    """1.0 when the last non-empty line is `Final: <answer>` with the expected answer (normalized)."""
    return float(grade(completion, example.answer))


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if there is none."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def boxed(completion: str, example: Example) -> float:
    """1.0 when the last `\\boxed{...}` equals the expected answer after normalization (and `$` stripped)."""
    found = last_boxed(completion)
    return float(found is not None and normalize_answer(found.strip("$ ")) == normalize_answer(example.answer))


def exact(completion: str, example: Example) -> float:
    """1.0 when the whole completion equals the expected answer after normalization."""
    return float(normalize_answer(completion) == normalize_answer(example.answer))


def make_reward(spec: str) -> Reward | None:
    """The reward named by `spec` (one of BUILT_IN, or `module:function`); None for `none`."""
    if spec == "none":
        return None
    if spec in BUILT_IN:
        return globals()[spec]
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ValueError(f"reward={spec!r} is not accepted; choose one of {', '.join(BUILT_IN)}, or module:function "
                         f"naming a Python callable (completion, example) -> float")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward={spec!r}: cannot import module {module_name!r} ({e}); put it on PYTHONPATH") from None
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ValueError(f"reward={spec!r}: module {module_name!r} has no callable {function_name!r}")

    def user_reward(completion: str, example: Example) -> float:
        return function(completion, example)
    user_reward.__name__ = spec  # so that an error names the callable
    return user_reward


def reward_name(config) -> str:
    """The run's reward: `reward=` if given, else final_answer for the built-in tasks and none for `data=`."""
    return config.reward or ("none" if config.data else "final_answer")


def score(reward: Reward, completion: str, example: Example) -> float:
    """reward(completion, example) as a finite float; a reward that raises or returns junk names the row and callable."""
    name = getattr(reward, "__name__", repr(reward))
    try:
        value = reward(completion, example)
    except Exception as e:
        raise ValueError(f"reward {name} raised on row {example.id!r}: {type(e).__name__}: {e}") from e
    if isinstance(value, numbers.Real) and math.isfinite(value):  # bool, int, float, numpy scalars
        return float(value)
    raise ValueError(f"reward {name} returned {value!r} on row {example.id!r}; it must return a finite number")
