"""Reading the user's prompts (`data=`, `eval_data=`) and the built-in tasks' rows: validated before any model.

`data=PATH` reads a `.jsonl`/`.json`/`.parquet`/`.csv` file, a `Dataset.save_to_disk` folder or
`hf:NAME[:SPLIT]` (a dataset in the local Hugging Face cache, offline) with the `datasets` library:
Arrow, memory-mapped, so a million-row file costs no RAM; rows become `Example`s only when indexed
(`Rows`). Every row goes through `opd.rows.example_from_row` and the privileged and reward rules
before anything else; a bad row names file, row (line for JSONL), field and fix, up to 5 of them with
the count, and nothing is half-loaded. One log line then says what was read.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from opd.rewards import NEEDS_ANSWER, Reward, make_reward, reward_name
from opd.rows import ANSWER_KEYS, PROMPT_KEYS, TEACHER_KEYS, Keys, RowError, example_from_row, first_present, lookup
from opd.tasks.base import Example

log = logging.getLogger(__name__)

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
SHOWN = 5  # bad rows listed in one error
TOKEN_SAMPLE = 2000  # prompts tokenized for the length summary (evenly spaced when there are more)


class Table:
    """Rows of one source, a `datasets.Dataset` (memory-mapped Arrow) or a list of dicts, with how to name a row."""

    def __init__(self, rows, label: str, kind: str, line_numbers: Sequence[int] | None = None):
        self.rows, self.label, self.kind, self.line_numbers = rows, label, kind, line_numbers

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[int(i)]

    @functools.cached_property
    def columns(self) -> list[str]:
        if hasattr(self.rows, "column_names"):
            return list(self.rows.column_names)
        return sorted({k for row in self.rows for k in row})

    def batches(self, size: int = 8192) -> Iterator[list[dict]]:
        if hasattr(self.rows, "with_format"):  # Arrow batches to Python in C++: 3x faster than row by row
            for batch in self.rows.with_format("arrow").iter(batch_size=size):
                yield batch.to_pylist()
        else:
            for start in range(0, len(self.rows), size):
                yield self.rows[start:start + size]

    def where(self, i: int) -> str:
        """`line N` for JSONL and CSV (1-based, as an editor shows it), `row N` (0-based) for the others."""
        if self.kind == "jsonl":
            return f"line {self.line_numbers[i] if self.line_numbers else i + 1}"
        if self.kind == "csv":
            return f"line {i + 2}"  # after the header line, if no field holds a newline
        return f"row {i}"


def jsonl_line_numbers(path: Path) -> list[int]:
    """The line number of each non-blank line (what `datasets` counts as rows)."""
    with path.open("rb") as f:
        return [n for n, line in enumerate(f, start=1) if line.strip()]


def read_json_by_hand(path: Path) -> Table:
    """JSON rows Arrow cannot type (a column that is a string in one row and a list in another): parsed
    with `json`, naming the line of a line that does not parse."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix the file") from None
        kind, lines = "json", None
    else:
        rows, lines, kind = [], [], "jsonl"
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); fix the line") from None
            lines.append(n)
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if not isinstance(rows, list) or bad is not None:
        where = f"{path}:{lines[bad]}" if lines else f"{path}: row {bad}"
        raise ValueError(f"{where}: expected a JSON object per row (a JSON array of objects, or one object a line)")
    return Table(rows, str(path), kind, lines)


def read_table(source: str) -> Table:
    """The rows of `source`: a file, a `save_to_disk` folder, or `hf:NAME[:SPLIT]` from the local cache."""
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file Arrow cannot type is read by hand, quietly
    if source.startswith("hf:"):
        name, _, split = source.removeprefix("hf:").partition(":")
        try:
            with offline():
                rows = datasets.load_dataset(name, split=split or "train")
        except Exception as e:  # no network here: a dataset that is not cached cannot be found
            raise ValueError(f"data={source!r}: {name!r} (split {split or 'train'!r}) is not in the local Hugging Face "
                             f"cache ({type(e).__name__}: {str(e).splitlines()[0][:200]}); download it once with "
                             f"`datasets.load_dataset({name!r})` where there is a network, or give a file") from None
        return Table(rows, source, "hf")
    path = Path(source)
    if path.is_dir():
        try:
            rows = datasets.load_from_disk(str(path))
        except FileNotFoundError as e:
            raise ValueError(f"data={source!r} is a folder but not one saved by Dataset.save_to_disk ({e})") from None
        if isinstance(rows, datasets.DatasetDict):
            raise ValueError(f"data={source!r} holds several splits ({', '.join(rows)}); name one: {source}/{next(iter(rows))}")
        return Table(rows, source, "folder")
    if not path.is_file():
        raise ValueError(f"data={source!r}: no such file or folder; give a .jsonl, .json, .parquet or .csv file, a "
                         f"save_to_disk folder, or hf:NAME[:SPLIT]")
    if path.suffix not in FORMATS:
        raise ValueError(f"data={source!r}: unknown file type {path.suffix!r}; accepted: {', '.join(FORMATS)}, a "
                         f"save_to_disk folder, or hf:NAME[:SPLIT]")
    try:
        extra = {"features": csv_as_text(path)} if path.suffix == ".csv" else {}
        rows = datasets.load_dataset(FORMATS[path.suffix], data_files=str(path), split="train", **extra)
    except Exception as e:
        if FORMATS[path.suffix] != "json":
            raise ValueError(f"data={source!r}: cannot read it as {path.suffix} ({type(e).__name__}: "
                             f"{str(e.__cause__ or e).splitlines()[0][:200]})") from None
        return read_json_by_hand(path)  # mixed column types, or a line that does not parse: found by hand
    kind = "jsonl" if path.suffix == ".jsonl" else FORMATS[path.suffix]
    return Table(rows, source, kind, jsonl_line_numbers(path) if kind == "jsonl" and _has_blank_lines(path) else None)


def csv_as_text(path: Path):
    """Every CSV column read as text: an answer "007" or "3.50" stays what the file says."""
    import csv

    import datasets

    with path.open(newline="", encoding="utf-8") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _has_blank_lines(path: Path) -> bool:
    with path.open("rb") as f:
        return any(not line.strip() for line in f)


class offline:
    """`datasets` offline for one call (HF_HUB_OFFLINE is read once, at import time, into its config)."""

    def __enter__(self):
        import datasets

        self.before = datasets.config.HF_HUB_OFFLINE
        datasets.config.HF_HUB_OFFLINE = True

    def __exit__(self, *exc):
        import datasets

        datasets.config.HF_HUB_OFFLINE = self.before


class Rows(Sequence):
    """The examples of a validated table, converted when indexed (a big file stays on disk, memory-mapped)."""

    def __init__(self, table: Table, indices: np.ndarray, keys: Keys):
        self.table, self.indices, self.keys = table, indices, replace(keys, columns=frozenset(table.columns))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return example_from_row(self.table[self.indices[i]], self.keys)


@dataclass
class Counts:
    """What one validation pass saw (the summary log line)."""

    rows: int = 0
    teacher: int = 0
    answers: int = 0
    routes: int = 0
    references: int = 0

    def add(self, ex: Example) -> None:
        self.rows += 1
        self.teacher += ex.teacher_prompt != ex.prompt
        self.answers += bool(ex.answer)
        self.routes += ex.route is not None
        self.references += bool(ex.solution)


@dataclass(frozen=True)
class Data:
    """A run's validated prompts: training rows, evaluation rows, the reward, and what was read."""

    train: Sequence[Example]
    eval: Sequence[Example]
    reward: Reward | None
    reward_name: str
    summary: str


def validate_table(table: Table, keys: Keys, reward: str, privileged_task: bool = False) -> tuple[Counts, np.ndarray]:
    """Check every row; raise listing up to SHOWN bad rows and the count. Returns the counts and each row's
    hash in [0, 1) (the held-out split). Privileged rules apply to a row that gives a teacher prompt, and
    to every row of a `*_privileged` task; a reward that compares answers needs one on every row."""
    from opd.validate import privileged_problem  # opd.validate imports opd.tasks, as this module does

    columns = table.columns
    if keys.prompt is None and not any(k in columns for k in PROMPT_KEYS):
        raise ValueError(f"{table.label}: no student prompt column; expected one of {', '.join(PROMPT_KEYS)}, found "
                         f"{', '.join(columns) or 'none'}; set prompt_key=COLUMN")
    keys = replace(keys, columns=frozenset(columns))
    counts, bad, n_bad = Counts(), [], 0
    hash_N, ids = np.zeros(len(table)), []  # ids: (hash, row) of the rows with an `id` column
    i = 0
    for batch in table.batches():
        for row in batch:
            try:
                ex = example_from_row(row, keys)
                teacher_key, teacher = first_present(row, keys.teacher_keys)
                problem = None
                if teacher is not None and ex.teacher_prompt == ex.prompt:
                    problem = (f"field {teacher_key!r} equals the student prompt; give the teacher more context "
                               f"than the student (privileged), or drop it from the row for plain distillation")
                elif teacher is not None or privileged_task:
                    problem = privileged_problem(ex, need_answer=privileged_task)
                if problem is None and reward in NEEDS_ANSWER and not ex.answer:
                    problem = (f"field {keys.answer or ANSWER_KEYS[0]!r} is missing: reward={reward} compares against "
                               f"the expected answer; add it to every row (or set answer_key=), or set reward=none")
            except RowError as e:
                problem = str(e)
            if problem is not None:
                n_bad += 1
                if len(bad) < SHOWN:
                    bad.append(f"{table.where(i)}: {problem}")
            else:
                counts.add(ex)
                if row.get("id") is not None:
                    ids.append((hash(ex.id), i))
                    hash_N[i] = int(hashlib.blake2b(ex.id.encode(), digest_size=8).hexdigest(), 16) / 2.0**64
                else:  # the id is a blake2b hash of the content already
                    hash_N[i] = int(ex.id, 16) / 2.0**64
            i += 1
    if not n_bad and ids:
        bad, n_bad = duplicated_ids(table, ids)
    if n_bad:
        more = f" | and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
        raise ValueError(f"{table.label}: {n_bad} bad row{'s' * (n_bad > 1)} of {len(table)}, nothing loaded: "
                         f"{' | '.join(bad)}{more}")
    if not len(table):
        raise ValueError(f"{table.label}: no rows; give a file with at least one prompt")
    return counts, hash_N


def duplicated_ids(table: Table, ids: list[tuple[int, int]]) -> tuple[list[str], int]:
    """(up to SHOWN messages, count) of rows whose `id` an earlier row already has."""
    hash_N = np.array([h for h, _ in ids], dtype=np.int64)
    order = np.argsort(hash_N, kind="stable")
    repeats = order[1:][hash_N[order][1:] == hash_N[order][:-1]]  # a repeat's first occurrence comes earlier
    repeats = sorted(ids[j][1] for j in repeats)
    shown = [f"{table.where(i)}: field 'id' {str(table[i]['id'])!r} is duplicated; give each row its own id"
             for i in repeats[:SHOWN]]
    return shown, len(repeats)


def read_rows(source: str, keys: Keys, reward: str) -> tuple[Table, Counts, np.ndarray]:
    """A file / folder / `hf:` source, read and validated."""
    table = read_table(source)
    return (table, *validate_table(table, keys, reward))


def task_table(config, split: str) -> Table:
    from opd.tasks import task_rows

    n = config.train_size if split == "train" else config.eval_size
    return Table(task_rows(config.task, split, n, config.seed, config.data_dir), f"task {config.task} ({split})", "task")


def load_data(config) -> Data:
    """The run's prompts from `data`/`eval_data` or the built-in `task`, every row validated (no model loaded).

    Held out from `data` without `eval_data`: the rows whose id hashes below `eval_fraction` (at least
    one row when there are two), at most `eval_size` of them; `eval_fraction=0` evaluates on the first
    `eval_size` training rows. Every row of `data` trains (`train_size` caps the built-in tasks only).
    """
    name = reward_name(config)
    reward = make_reward(name)
    keys = Keys(config.prompt_key, config.teacher_prompt_key, config.answer_key, config.system_prompt)
    if not config.data:
        privileged = config.task.endswith("_privileged")
        train_table, eval_table = task_table(config, "train"), task_table(config, "test")
        counts, _ = validate_table(train_table, keys, name, privileged)
        validate_table(eval_table, keys, name, privileged)
        train = Rows(train_table, np.arange(len(train_table)), keys)
        held_out = Rows(eval_table, np.arange(len(eval_table)), keys)
        split = f"{len(eval_table)} held-out test rows"
    else:
        train_table, counts, hash_N = read_rows(config.data, keys, name)
        if config.eval_data:
            eval_table, _, _ = read_rows(config.eval_data, keys, name)
            train_N, eval_N = np.arange(len(train_table)), np.arange(min(len(eval_table), config.eval_size))
            split = f"{len(eval_N)} eval rows from {config.eval_data}"
        elif config.eval_fraction == 0:
            eval_table, train_N = train_table, np.arange(len(train_table))
            eval_N = train_N[: config.eval_size]
            split = f"eval_fraction=0: evaluated on the first {len(eval_N)} training rows"
        else:
            held_N = hash_N < config.eval_fraction
            if not held_N.any() and len(hash_N) > 1:
                held_N[np.argmin(hash_N)] = True  # a small file still gets one held-out row
            eval_table, train_N, eval_N = train_table, np.flatnonzero(~held_N), np.flatnonzero(held_N)[: config.eval_size]
            split = f"{held_N.sum()} held out by eval_fraction={config.eval_fraction} (a hash of the row), {len(eval_N)} evaluated"
            if not len(train_N):
                raise ValueError(f"{config.data}: every row is held out; lower eval_fraction or give eval_data=PATH")
        train, held_out = Rows(train_table, train_N, keys), Rows(eval_table, eval_N, keys)
    summary = summarize(train_table.label, counts, f"{len(train)} train; {split}", name, prompt_lengths(config, train))
    log.info(summary)
    return Data(train=train, eval=held_out, reward=reward, reward_name=name, summary=summary)


def eval_rows(args) -> tuple[list[Example], Reward | None]:
    """`opd eval`'s rows: the first `--n` of `--data` (all of them are evaluated, none held out) or of a
    built-in task's test split, validated; and the reward (`--reward`, default as for `opd train`)."""
    from types import SimpleNamespace

    if args.data and args.task:
        raise ValueError(f"--task {args.task} and --data {args.data} both name the rows; give one")
    config = SimpleNamespace(data=args.data, reward=args.reward, task=args.task or "arithmetic")
    name = reward_name(config)
    reward = make_reward(name)
    keys = Keys(args.prompt_key, args.teacher_prompt_key, args.answer_key, args.system_prompt)
    if not args.data:
        if any(v is not None for v in (args.prompt_key, args.teacher_prompt_key, args.answer_key, args.system_prompt)):
            raise ValueError("--prompt-key, --teacher-prompt-key, --answer-key and --system-prompt act with --data only")
        from opd.tasks import task_rows

        table = Table(task_rows(config.task, "test", args.n, args.seed, args.data_dir), f"task {config.task} (test)", "task")
        counts, _ = validate_table(table, keys, name, config.task.endswith("_privileged"))
    else:
        table, counts, _ = read_rows(args.data, keys, name)
    examples = Rows(table, np.arange(min(len(table), args.n)), keys)[:]
    lengths = prompt_lengths(SimpleNamespace(student=args.student, max_new_tokens=args.max_new_tokens), examples)
    log.info(summarize(table.label, counts, f"the first {len(examples)} evaluated", name, lengths))
    return examples, reward


def prompt_lengths(config, examples: Sequence[Example]) -> str:
    """min/median/max prompt tokens (student template) and how many exceed the context budget."""
    from transformers import AutoConfig

    from opd.models import load_tokenizer, resolve
    from opd.tokenization import render_prompt

    tokenizer = load_tokenizer(config.student)  # a tokenizer, not a model: cheap, and the data is judged before models
    n = len(examples)
    picked = range(n) if n <= TOKEN_SAMPLE else np.linspace(0, n - 1, TOKEN_SAMPLE).astype(int)
    lengths = [len(render_prompt(tokenizer, examples[int(i)].prompt)) for i in picked]
    context = getattr(AutoConfig.from_pretrained(resolve(config.student)), "max_position_embeddings", None)
    text = (f"prompt tokens min/median/max {min(lengths)}/{statistics.median(lengths):.0f}/{max(lengths)}"
            + (f" (a sample of {len(lengths)})" if n > TOKEN_SAMPLE else ""))
    if context:
        budget = context - config.max_new_tokens
        over = sum(length > budget for length in lengths)
        text += f", {over} over the budget of {budget} (context {context} - max_new_tokens {config.max_new_tokens})"
        if over:
            log.warning("%d of %d prompts are longer than %d tokens: the student cannot complete them within its "
                        "context; shorten them or lower max_new_tokens", over, len(lengths), budget)
    return text


def summarize(label: str, c: Counts, used: str, reward: str, lengths: str) -> str:
    return (f"data: {label}: {c.rows} rows ({used}): {c.teacher} with teacher prompts, "
            f"{c.answers} with answers, {c.routes} with routes, {c.references} trailing assistant turns kept as "
            f"reference completions; {lengths}; reward {reward}"
            + (" (the answers are unused: set reward=final_answer, boxed, exact or module:function to grade them)"
               if reward == "none" and c.answers else ""))


def resolve_steps(config, n_train: int):
    """`config` with `steps` derived from `epochs` when only epochs is given: ceil(rows · E / prompts_per_step)."""
    if config.steps is not None:
        return config
    return replace(config, steps=math.ceil(n_train * config.epochs / config.prompts_per_step))


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1_000_019]).permutation(n)


def epoch_prompts(n_prompts: int, k: int, seed: int, step: int) -> list[int]:
    """Step `step`'s prompts when walking the rows without replacement, each epoch reshuffled from the seed.

    Prompt position p = (step - 1) · k + j is row `order_e[p mod n]` of epoch e = p // n: a pure function
    of (seed, step), so a run resumed mid-epoch continues the same order. A step may straddle two epochs.
    """
    positions = range((step - 1) * k, step * k)
    return [int(_epoch_order(n_prompts, seed, p // n_prompts)[p % n_prompts]) for p in positions]


class LazyList(Sequence):
    """`get(i)` for i in range(n), computed when asked for."""

    def __init__(self, n: int, get):
        self.n, self.get = n, get

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.get(i)


def rendered(tokenizer, examples: Sequence[Example], teacher: bool = False) -> LazyList:
    """Each example's prompt ids in `tokenizer`'s template, rendered when first asked for and kept: a big
    file is never rendered whole, a step's prompts only once."""
    from opd.tokenization import render_prompt

    @functools.lru_cache(maxsize=None)
    def ids(i: int) -> list[int]:
        return render_prompt(tokenizer, examples[i].teacher_prompt if teacher else examples[i].prompt)
    return LazyList(len(examples), ids)
