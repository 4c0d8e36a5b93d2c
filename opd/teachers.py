"""Several teachers in one run (#22): who they are, which rows each one scores, how many prompts each gets.

`teachers:` in a recipe maps a route name to that teacher's settings (`TeacherSpec`); the single
`teacher=` is the one-teacher case, named `teacher`. A row picks its teacher by its route column
(`teacher` > `teacher_id` > `data_source`, opd/rows.py), else `default_teacher`; a row naming an
unknown teacher, or a row with no route and no default, is a data error before any model loads
(`check_routes`, called by `opd.data.load_data`). `teacher_mix:` weights how many of a step's prompts
each teacher gets (`mixed_prompts`). Standard library only: `opd.config` validates with it.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
from dataclasses import dataclass, fields
from pathlib import Path

SINGLE = "teacher"  # the name of the one teacher of a run without `teachers:`
SELF = "self"  # the path of a teacher that is the student itself (#24, opd/self_teacher.py)
SELF_TEACHER_MODES = ("frozen", "snapshot", "ema", "live")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")  # a route name becomes a metric key: opd/<name>/...


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher of the run; unset fields take the run's `teacher_*` / `device` / `kl_coef` values."""

    name: str
    path: str  # a local Hugging Face folder or tiny:NAME (remote backends: its tokenizer + config only)
    backend: str = "hf"  # hf (in-process), vllm (in-process engine) or served (`vllm serve` over HTTP)
    url: str | None = None  # served: base URL(s), comma-separated
    model_name: str | None = None  # served: the name it is served under (default: path)
    dtype: str | None = None  # its weight dtype (default: the run's teacher_dtype, else dtype)
    device: str | None = None  # where an in-process teacher sits (default: the run's device)
    timeout_s: float = 300.0  # served: seconds per request attempt
    kl_coef: float = 1.0  # weight of its rows' reverse-KL advantage (loss=reverse_kl)
    temperature: float | None = None  # only the run's τ is accepted (docs/design.md §4: one τ on both sides)


SETTINGS = tuple(f.name for f in fields(TeacherSpec) if f.name != "name")


def teacher_specs(config) -> dict[str, TeacherSpec]:
    """name -> spec: `config.teachers` entries over the run's defaults, or the single `teacher=` as `teacher`."""
    defaults = dict(backend=config.teacher_backend, url=config.teacher_url, model_name=config.teacher_model_name,
                    dtype=config.teacher_dtype, device=config.device, timeout_s=config.teacher_timeout_s,
                    kl_coef=config.kl_coef)
    if not config.teachers:
        return {SINGLE: TeacherSpec(SINGLE, config.teacher, **defaults)}
    specs = {}
    for name, entry in config.teachers.items():
        entry = {"path": entry} if isinstance(entry, str) else dict(entry or {})
        if unknown := sorted(set(entry) - set(SETTINGS)):
            raise ValueError(f"teachers.{name}.{unknown[0]} is not a teacher setting; accepted: {', '.join(SETTINGS)}")
        if not entry.get("path"):
            raise ValueError(f"teachers.{name}.path is missing: give the teacher's folder (or tiny:NAME)")
        merged = defaults | entry
        if merged["backend"] != "served" and "url" not in entry:  # the run's teacher_url is a served teacher's
            merged["url"] = None
        specs[str(name)] = TeacherSpec(str(name), **merged)
    return specs


def check_teachers(config) -> None:
    """Raise ValueError naming `teachers.<name>.<setting>` (or the run field) and the fix; no model is read."""
    if not config.teachers:
        for name in ("default_teacher", "teacher_mix"):
            if getattr(config, name) is not None:
                raise ValueError(f"{name} only acts with several teachers: give teachers: (a route name -> settings) "
                                 f"or remove {name}")
        return
    specs = teacher_specs(config)
    if config.loss == "cross_entropy":
        raise ValueError("teachers: off-policy distillation (loss=cross_entropy) samples from one teacher; route "
                         "rows to several teachers with an on-policy loss (reverse_kl, topk_kl, jsd, student_topk_rkl)")
    if config.teacher_backend == "none":
        raise ValueError("teachers: with teacher_backend=none (pure GRPO) there is no teacher to route to")
    for name, s in specs.items():
        where = f"teachers.{name}"
        if not NAME_RE.match(name):
            raise ValueError(f"{where}: a teacher name becomes a metric key (opd/{name}/...); use letters, digits, "
                             f"'_', '-' or '.'")
        if s.backend not in ("hf", "vllm", "served"):
            raise ValueError(f"{where}.backend={s.backend!r} is not accepted; choose one of hf, vllm, served")
        if (s.backend == "served") != (s.url is not None):
            raise ValueError(f"{where}.url is needed exactly when {where}.backend=served (e.g. url: http://host:8000)")
        if s.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"{where}.dtype={s.dtype!r} is not accepted; choose one of float32, bfloat16")
        if s.temperature is not None and s.temperature != config.temperature:
            raise ValueError(f"{where}.temperature={s.temperature} differs from temperature={config.temperature}: the "
                             f"student samples every prompt at one τ and both sides of a divergence use it "
                             f"(docs/design.md §4); remove it or set temperature={s.temperature} for the run")
        if not (s.kl_coef >= 0 and math.isfinite(s.kl_coef)):
            raise ValueError(f"{where}.kl_coef must be a finite number >= 0, got {s.kl_coef}")
        if s.kl_coef != config.kl_coef and config.loss != "reverse_kl":
            raise ValueError(f"{where}.kl_coef weighs the reverse-KL advantage (loss=reverse_kl); loss={config.loss} "
                             f"has none: remove it, or give the teacher more prompts with teacher_mix:")
        if s.timeout_s <= 0:
            raise ValueError(f"{where}.timeout_s must be > 0, got {s.timeout_s}")
        if not (s.path == SELF or s.path.startswith("tiny:") or (Path(s.path) / "config.json").is_file()):
            raise ValueError(f"{where}.path={s.path!r} is not a model folder (no config.json there); give a local "
                             f"Hugging Face folder or tiny:NAME")
    scored_at = {config.temperature} | ({config.loss_temperature} if config.loss == "topk_kl" else set())
    if any(s.backend == "served" for s in specs.values()) and scored_at != {1.0}:
        raise ValueError("a served teacher scores at temperature 1 only (vLLM's prompt logprobs are of the raw "
                         "logits); set temperature and loss_temperature to 1.0, or use backend: hf")
    if config.default_teacher is not None and config.default_teacher not in specs:
        raise ValueError(f"default_teacher={config.default_teacher!r} is not in teachers ({', '.join(specs)})")
    if config.teacher_mix is not None:
        if config.epochs is not None:
            raise ValueError("teacher_mix draws each step's prompts by teacher afresh and epochs walks the rows in "
                             "order: choose one (remove teacher_mix or epochs)")
        for name, w in config.teacher_mix.items():
            if name not in specs:
                raise ValueError(f"teacher_mix.{name}: no such teacher; teachers are {', '.join(specs)}")
            if not (isinstance(w, int | float) and w >= 0 and math.isfinite(w)):
                raise ValueError(f"teacher_mix.{name} must be a weight >= 0, got {w!r}")
        if not sum(config.teacher_mix.values()) > 0:
            raise ValueError("teacher_mix: the weights sum to 0; give at least one teacher a weight > 0")


def uses_self(config) -> bool:
    """Whether a teacher of the run is the student itself (`teacher=self`, or `path: self` in `teachers:`)."""
    return any(s.path == SELF for s in teacher_specs(config).values())


def check_self_teacher(config) -> None:
    """Raise ValueError naming the field and the fix for a bad `teacher=self` setting; no model is read."""
    if config.self_teacher not in SELF_TEACHER_MODES:
        raise ValueError(f"self_teacher={config.self_teacher!r} is not accepted; choose one of "
                         f"{', '.join(SELF_TEACHER_MODES)}")
    if not uses_self(config):
        defaults = {f.name: f.default for f in fields(config) if f.name.startswith("self_teacher")}
        if changed := [k for k, v in defaults.items() if getattr(config, k) != v]:
            raise ValueError(f"{changed[0]} only acts with teacher=self (the student as its own teacher); set "
                             f"teacher=self or remove {changed[0]}")
        return
    selfs = [s for s in teacher_specs(config).values() if s.path == SELF]
    if any(s.backend != "hf" for s in selfs) or config.teacher_backend == "none":
        raise ValueError("teacher=self scores with the student's own weights in this process: it needs "
                         "teacher_backend=hf (a vllm or served teacher is another model)")
    if config.fsdp:
        raise ValueError("teacher=self with fsdp=true is not implemented (the copy of a sharded student); use fsdp=false")
    if config.self_teacher == "snapshot" and not (isinstance(config.self_teacher_every, int)
                                                  and config.self_teacher_every >= 1):
        raise ValueError(f"self_teacher_every must be an integer >= 1 (optimizer steps between snapshots), got "
                         f"{config.self_teacher_every}")
    if config.self_teacher == "ema" and not 0.0 < config.self_teacher_ema < 1.0:
        raise ValueError(f"self_teacher_ema must be in (0, 1) (the decay of θ_T ← d·θ_T + (1 - d)·θ_S), got "
                         f"{config.self_teacher_ema}")
    dtypes = {s.dtype for s in selfs} - {None, "float32"}
    if dtypes and config.self_teacher in ("ema", "live"):
        raise ValueError(f"teacher_dtype={dtypes.pop()} with self_teacher={config.self_teacher}: "
                         + ("an EMA in bf16 loses every update below bf16's resolution; keep the teacher float32"
                            if config.self_teacher == "ema" else "the live teacher is the student's fp32 weights; "
                            "remove teacher_dtype"))


def route_of(example, config) -> str:
    """The teacher that scores `example`: its route, else `default_teacher` (the one teacher without `teachers:`)."""
    if not config.teachers:
        return SINGLE
    return example.route if example.route is not None else config.default_teacher


def check_routes(config, routes: dict, unrouted: str | None, label: str) -> None:
    """Every row's teacher exists: `routes` maps each route name seen to its first row, `unrouted` is the first row
    without one (None if every row has one). A data error naming the row, before any model loads."""
    if not config.teachers:
        return
    specs = teacher_specs(config)
    if unknown := [name for name in routes if name not in specs]:
        raise ValueError(f"{label} {routes[unknown[0]]}: teacher {unknown[0]!r} is not one of the teachers "
                         f"({', '.join(specs)}); add it to teachers: or fix the row's route column")
    if unrouted is not None and config.default_teacher is None:
        raise ValueError(f"{label} {unrouted}: the row names no teacher (no teacher/teacher_id/data_source column); "
                         f"set default_teacher= to one of {', '.join(specs)}, or add the column")


def mixed_prompts(routes_N: list[str], mix: dict[str, float], k: int, seed: int, step: int) -> list[int]:
    """k row indices for the step, about `k · w / Σw` of them routed to each teacher (largest remainder), each
    drawn without replacement from that teacher's rows: a pure function of (seed, step), as `step_prompts`."""
    rows = {name: [i for i, r in enumerate(routes_N) if r == name] for name in mix}
    weights = {name: w for name, w in mix.items() if w > 0 and rows[name]}
    if not weights:
        raise ValueError(f"teacher_mix: no training row is routed to {', '.join(n for n, w in mix.items() if w > 0)}")
    total = sum(weights.values())
    quota = {name: k * w / total for name, w in weights.items()}
    counts = {name: int(q) for name, q in quota.items()}
    for name in sorted(quota, key=lambda n: counts[n] - quota[n])[: k - sum(counts.values())]:
        counts[name] += 1
    rng = random.Random(f"{seed}:{step}:mix")
    return [i for name in weights for i in rng.sample(rows[name], min(counts[name], len(rows[name])))]


def manifest(specs: dict[str, TeacherSpec], resolve) -> dict[str, dict]:
    """name -> {path, backend, dtype, config_sha256}: what a checkpoint records of its teachers; `resolve` maps a path
    to its folder (`opd.models.resolve`). Resume refuses a changed manifest (opd/runfolder.py)."""
    out = {}
    for name, s in specs.items():
        if s.path == SELF:  # the student's own weights: the run's `student` and `self_teacher` fields cover it
            out[name] = {"path": SELF, "backend": s.backend, "dtype": s.dtype, "config_sha256": None}
            continue
        config_json = Path(resolve(s.path)) / "config.json"
        digest = hashlib.sha256(config_json.read_bytes()).hexdigest()[:16] if config_json.is_file() else None
        out[name] = {"path": s.path, "backend": s.backend, "dtype": s.dtype, "config_sha256": digest}
    return out


def check_student_topk_rkl(config) -> None:
    """loss=student_topk_rkl needs the student's top-k ids recorded by its sampler (rollout_backend=hf) and the
    teacher's logprobs at those ids, which only an in-process teacher returns (docs/design.md §4)."""
    if config.rollout_backend != "hf":
        raise ValueError("loss=student_topk_rkl needs the student's top-k ids of each sampled position, which only "
                         "rollout_backend=hf records; set rollout_backend=hf")
    for name, spec in teacher_specs(config).items():
        if spec.backend != "hf":
            where = "teacher_backend" if not config.teachers else f"teachers.{name}.backend"
            raise ValueError(f"loss=student_topk_rkl needs the teacher's logprobs at the student's top-k ids; "
                             f"{where}={spec.backend} returns only its own top-k (prompt_logprobs): use an "
                             f"in-process teacher ({where}=hf)")
