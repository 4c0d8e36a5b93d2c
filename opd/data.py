"""Reading the user's prompts (`data=`, `eval_data=`) and the built-in tasks' rows: validated before any model.

`data=PATH` reads a `.jsonl`/`.json`/`.parquet`/`.csv` file, a `Dataset.save_to_disk` folder or
`hf:NAME[:SPLIT]` (a dataset in the local Hugging Face cache, offline) with the `datasets` library
(`opd.sources`): Arrow, memory-mapped, so a million-row file costs no RAM; rows become `Example`s
only when indexed (`Rows`). Every row goes through `opd.rows.example_from_row` and the privileged and reward rules
before anything else; a bad row names file, row (line for JSONL), field and fix, up to 5 of them with
the count, and nothing is half-loaded. One log line then says what was read.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from opd.rewards import NEEDS_ANSWER, Reward, make_reward, reward_name
from opd.rows import ANSWER_KEYS, PROMPT_KEYS, Keys, RowError, example_from_row, first_present
from opd.sources import Table, read_table
from opd.tasks.base import Example
from opd.teachers import check_routes

log = logging.getLogger(__name__)

SHOWN = 5  # bad rows listed in one error
TOKEN_SAMPLE = 2000  # prompts tokenized for the length summary (evenly spaced when there are more)


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
    route_rows: dict = field(default_factory=dict)  # each route name seen -> its first row (for check_routes)
    unrouted_row: str | None = None  # the first row that names no teacher

    def add(self, ex: Example, where: str = "") -> None:
        self.rows += 1
        self.teacher += ex.teacher_prompt != ex.prompt
        self.answers += bool(ex.answer)
        self.routes += ex.route is not None
        self.references += bool(ex.solution)
        if ex.route is None:
            self.unrouted_row = self.unrouted_row or where
        else:
            self.route_rows.setdefault(ex.route, where)


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
    hash in [0, 1) (the held-out split)."""
    columns = table.columns
    if keys.prompt is None and not any(k in columns for k in PROMPT_KEYS):
        raise ValueError(f"{table.label}: no student prompt column; expected one of {', '.join(PROMPT_KEYS)}, found "
                         f"{', '.join(columns) or 'none'}; set prompt_key=COLUMN")
    keys = replace(keys, columns=frozenset(columns))
    counts, bad, n_bad = Counts(), [], 0
    hash_N, ids = np.zeros(len(table)), []  # ids: (hash, row) of the rows with an `id` column
    for i, row in enumerate(itertools.chain.from_iterable(table.batches())):
        ex, problem = check_row(row, keys, reward, privileged_task)
        if problem is not None:
            n_bad += 1
            bad += [f"{table.where(i)}: {problem}"] if len(bad) < SHOWN else []
            continue
        counts.add(ex, table.where(i))
        if row.get("id") is not None:
            ids.append((hash(ex.id), i))
            hash_N[i] = int(hashlib.blake2b(ex.id.encode(), digest_size=8).hexdigest(), 16) / 2.0**64
        else:  # the id is a blake2b hash of the content already
            hash_N[i] = int(ex.id, 16) / 2.0**64
    if not n_bad and ids:
        bad, n_bad = duplicated_ids(table, ids)
    if n_bad:
        more = f" | and {n_bad - len(bad)} more" if n_bad > len(bad) else ""
        raise ValueError(f"{table.label}: {n_bad} bad row{'s' * (n_bad > 1)} of {len(table)}, nothing loaded: "
                         f"{' | '.join(bad)}{more}")
    if not len(table):
        raise ValueError(f"{table.label}: no rows; give a file with at least one prompt")
    return counts, hash_N


def check_row(row: dict, keys: Keys, reward: str, privileged_task: bool) -> tuple[Example | None, str | None]:
    """(the row's example, what is wrong with it or None). Privileged rules apply to a row that gives a
    teacher prompt and to every row of a `*_privileged` task; a reward that compares answers needs one."""
    from opd.validate import privileged_problem  # opd.validate imports opd.tasks, as this module does

    try:
        ex = example_from_row(row, keys)
    except RowError as e:
        return None, str(e)
    teacher_key, teacher = first_present(row, keys.teacher_keys)
    if teacher is not None and ex.teacher_prompt == ex.prompt:
        return ex, (f"field {teacher_key!r} equals the student prompt; give the teacher more context than the "
                    f"student (privileged), or drop it from the row for plain distillation")
    if teacher is not None or privileged_task:
        if (problem := privileged_problem(ex, need_answer=privileged_task)) is not None:
            return ex, problem
    if reward in NEEDS_ANSWER and not ex.answer:
        return ex, (f"field {keys.answer or ANSWER_KEYS[0]!r} is missing: reward={reward} compares against the "
                    f"expected answer; add it to every row (or set answer_key=), or set reward=none")
    return ex, None


def duplicated_ids(table: Table, ids: list[tuple[int, int]]) -> tuple[list[str], int]:
    """(up to SHOWN messages, count) of rows whose `id` an earlier row already has."""
    hash_N = np.array([h for h, _ in ids], dtype=np.int64)
    order = np.argsort(hash_N, kind="stable")
    repeats = order[1:][hash_N[order][1:] == hash_N[order][:-1]]  # a repeat's first occurrence comes earlier
    repeats = sorted(ids[j][1] for j in repeats)
    shown = [f"{table.where(i)}: field 'id' {str(table[i]['id'])!r} is duplicated; give each row its own id"
             for i in repeats[:SHOWN]]
    return shown, len(repeats)


def checked_routes(config, table: Table, counts: Counts) -> Counts:
    """`counts`, after checking that every row's teacher exists (several teachers, opd/teachers.py)."""
    check_routes(config, counts.route_rows, counts.unrouted_row, table.label)
    return counts


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
        counts = checked_routes(config, train_table, validate_table(train_table, keys, name, privileged)[0])
        checked_routes(config, eval_table, validate_table(eval_table, keys, name, privileged)[0])
        train = Rows(train_table, np.arange(len(train_table)), keys)
        held_out = Rows(eval_table, np.arange(len(eval_table)), keys)
        split = f"{len(eval_table)} held-out test rows"
    else:
        train_table, counts, hash_N = read_rows(config.data, keys, name)
        checked_routes(config, train_table, counts)
        if config.eval_data:
            eval_table, eval_counts, _ = read_rows(config.eval_data, keys, name)
            checked_routes(config, eval_table, eval_counts)
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
