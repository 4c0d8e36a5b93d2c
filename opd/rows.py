"""The one row schema (docs/design.md §7 "Data rows"): a dict from a user's file or a built-in task -> `Example`.

It reads the peers' files as they are: TRL's `prompt` (messages or a string) and `teacher_id`;
Fireworks' `messages` + `teacher_messages` + `expected_answer` (a trailing assistant turn is the
row's reference completion, not part of the prompt); verl's `prompt` + `reward_model.ground_truth`
+ `data_source`; a plain `question` / `input` / `problem`. Every other column is kept as metadata
for the reward. A bad field raises `RowError` naming it and the fix; `opd.data` adds file and row.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from opd.tasks.base import Example
from opd.tasks.gsm8k import split_solution

PROMPT_KEYS = ("prompt", "messages", "question", "input", "problem")  # first match wins
TEACHER_KEYS = ("teacher_messages", "privileged_messages", "teacher_prompt_messages")  # Fireworks' precedence
ANSWER_KEYS = ("expected_answer", "answer", "expected", "reward_model.ground_truth", "extra_info.answer")
ROUTE_KEYS = ("teacher", "teacher_id", "data_source")  # kept for a multi-teacher run (docs/design.md §7)
ROLES = ("system", "developer", "user", "assistant", "tool")


class RowError(ValueError):
    """One bad field of one row: `field` names the column, `message` says what is wrong and the fix."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field {field!r} {message}")


@dataclass(frozen=True)
class Keys:
    """Column overrides (slime's `--input-key`) and the system message added to rows that have none.

    `columns` (a table's column names) drops the default candidates a table lacks, so a million
    rows do not each look up a dozen absent keys; an override is always looked up.
    """

    prompt: str | None = None
    teacher_prompt: str | None = None
    answer: str | None = None
    system_prompt: str | None = None
    columns: frozenset[str] | None = None

    def candidates(self, override: str | None, defaults: tuple[str, ...]) -> tuple[str, ...]:
        if override:
            return (override,)
        return tuple(k for k in defaults if self.columns is None or k.split(".")[0] in self.columns)

    @functools.cached_property  # frozen dataclasses allow it: it writes __dict__, not through __setattr__
    def prompt_keys(self) -> tuple[str, ...]:
        return self.candidates(self.prompt, PROMPT_KEYS)

    @functools.cached_property
    def teacher_keys(self) -> tuple[str, ...]:
        return self.candidates(self.teacher_prompt, TEACHER_KEYS)

    @functools.cached_property
    def answer_keys(self) -> tuple[str, ...]:
        return self.candidates(self.answer, ANSWER_KEYS)

    @functools.cached_property
    def route_keys(self) -> tuple[str, ...]:
        return self.candidates(None, ROUTE_KEYS)


def lookup(row: dict, key: str):
    """row[key], following `a.b` into nested dicts (verl's `reward_model.ground_truth`); None if absent."""
    if "." not in key:  # the common case, first: a million rows look up a dozen keys each
        return row.get(key)
    value = row
    for part in key.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def first_present(row: dict, keys: Sequence[str]) -> tuple[str | None, object]:
    """(name, value) of the first key whose value is not None (Arrow fills a row's missing columns with None)."""
    for key in keys:
        if (value := lookup(row, key)) is not None:
            return key, value
    return None, None


def to_messages(value, field: str) -> tuple[list[dict], str]:
    """(chat messages, dropped trailing assistant content or "") from a string or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError(field, "is an empty prompt; give the prompt text")
        return [{"role": "user", "content": value}], ""
    if not isinstance(value, list | tuple):
        raise RowError(field, f"is a {type(value).__name__}, not a string or a list of chat messages")
    messages = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") is None or m.get("content") is None:
            raise RowError(f"{field}[{j}]", "is not a message with 'role' and 'content'; give "
                                            "{'role': 'user', 'content': '...'}")
        if m["role"] not in ROLES:
            raise RowError(f"{field}[{j}].role", f"is {m['role']!r}, an unknown role; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise RowError(f"{field}[{j}].content", f"is a {type(m['content']).__name__}, not a string")
        messages.append(m if None not in m.values() else {k: v for k, v in m.items() if v is not None})
    reference = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else ""
    if not any(m["content"].strip() for m in messages):
        raise RowError(field, "is an empty prompt; give at least one non-empty user message before the assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise RowError(field, "has no user message; add {'role': 'user', 'content': '...'}")
    return messages, reference


def with_system(messages: list[dict], system_prompt: str | None) -> list[dict]:
    if system_prompt is None or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def strip_none(value):
    """A row's value without the None fields Arrow adds to nested structs of other rows' shapes."""
    if isinstance(value, dict):
        return {k: strip_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [strip_none(v) for v in value]
    return value


def row_id(prompt: list[dict], teacher_prompt: list[dict], answer: str) -> str:
    """A stable id from the row's content: the same row gets the same id in any file, at any position."""
    text = "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in [*prompt, {"role": "", "content": ""}, *teacher_prompt])
    return hashlib.blake2b(f"{text}\x1d{answer}".encode(), digest_size=8).hexdigest()


def example_from_row(row: dict, keys: Keys = Keys()) -> Example:
    """The one conversion of a data row to an `Example` (built-in tasks and files alike); raises RowError."""
    prompt_key, value = first_present(row, keys.prompt_keys)
    if value is None:
        wanted = repr(keys.prompt) if keys.prompt else " or ".join(PROMPT_KEYS)
        raise RowError(keys.prompt or PROMPT_KEYS[0], f"is missing: the student prompt is read from {wanted} "
                                                      f"(set prompt_key= to name another column)")
    prompt, reference = to_messages(value, prompt_key)
    teacher_key, value = first_present(row, keys.teacher_keys)
    teacher_prompt = to_messages(value, teacher_key)[0] if value is not None else prompt
    answer_key, answer = first_present(row, keys.answer_keys)
    if answer is not None and not isinstance(answer, str | int | float) or isinstance(answer, bool):
        raise RowError(answer_key, f"is a {type(answer).__name__}, not a string or a number")
    answer = "" if answer is None else str(answer).strip()
    if "####" in answer:  # a GSM8K answer field: the worked solution, then `#### <answer>`
        solution, answer = split_solution(answer)
        reference = reference or solution
    route_key, route = first_present(row, keys.route_keys)
    if route is not None and not isinstance(route, str):
        raise RowError(route_key, f"is a {type(route).__name__}, not a string naming a teacher")
    explicit_id = row.get("id")
    if explicit_id is not None and not isinstance(explicit_id, str | int) or isinstance(explicit_id, bool):
        raise RowError("id", f"is a {type(explicit_id).__name__}, not a string or an integer")
    prompt, teacher_prompt = with_system(prompt, keys.system_prompt), with_system(teacher_prompt, keys.system_prompt)
    used = {prompt_key, teacher_key, answer_key, route_key, "id"}
    metadata = {k: strip_none(v) for k, v in row.items() if k not in used and v is not None}
    return Example(prompt=prompt, teacher_prompt=teacher_prompt, answer=answer, solution=reference,
                   id=str(explicit_id) if explicit_id is not None else row_id(prompt, teacher_prompt, answer),
                   route=route, metadata=metadata)


