"""metrics.jsonl (one line per step), a progress bar, optional TensorBoard, and `opd plot`."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tqdm.auto import tqdm

from opd.report import eval_table
from opd.runfolder import atomic_write_text

log = logging.getLogger(__name__)
HEADLINE = ("opd/sampled_reverse_kl", "task/reward", "eval/student_accuracy")
PLOTS = (  # (title, keys) of `opd plot`; missing keys are skipped
    ("loss", ("train/loss",)),
    ("sampled reverse KL (nats/token)", ("opd/sampled_reverse_kl",)),
    ("held-out greedy accuracy", ("eval/student_accuracy", "eval/teacher_accuracy")),
    ("teacher-trace gap, held-out (nats/token)", ("eval/trace_gap", "eval/trace_gap_pre_final", "eval/trace_gap_final")),
    ("teacher-trace gap, training rows (nats/token)",
     ("eval_train/trace_gap", "eval_train/trace_gap_pre_final", "eval_train/trace_gap_final")),
    ("completion tokens / s", ("perf/tokens_per_s",)),
)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in {run_dir}; is it a run folder of `opd train`?")
    return parse_metrics(path)


def parse_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; a torn last line (a write cut short by a kill) is dropped with a warning.

    A bad line anywhere else is not a kill's doing, so it is an error naming the file and line.
    """
    lines = path.read_text().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            if number < len(lines) - (lines[-1] == ""):
                raise ValueError(f"{path}:{number}: not a JSON line ({e}); fix or delete that line") from None
            log.warning("warning: %s:%d is a torn line (a write cut short); dropped it", path, number)
    return records


class MetricsWriter:
    """The run's records: `config.json` (written here, once the run really starts) and one JSON line per step.

    On resume the lines of steps after the checkpoint are dropped by rewriting the file through a
    temp file and a rename, so a kill during the rewrite leaves the old file or the new, never half.
    """

    def __init__(self, run_dir: Path, config, start_step: int):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.log_samples = config.log_samples
        atomic_write_text(Path(run_dir) / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
        if self.path.exists():
            kept = [r for r in parse_metrics(self.path) if start_step and r["step"] <= start_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = self.path.open("a")
        self.bar = tqdm(total=config.steps, initial=start_step, disable=not config.progress, unit="step", dynamic_ncols=True)
        self.tb = None
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # needs the `tensorboard` extra

            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        self.wandb = None
        if config.wandb_project:
            import wandb  # optional: pip install wandb

            self.wandb = wandb.init(project=config.wandb_project, config=config.to_dict(), dir=str(run_dir),
                                    resume="allow")

    def log(self, step: int, metrics: dict, samples: bool = False) -> None:
        transcripts = metrics.pop("eval/samples", None)
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            tqdm.write(f"warning: step {step}: non-finite metrics {bad}")
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step":
                    self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(record, step=step)
        if step:
            self.bar.update(1)
        self.bar.set_postfix({k.split("/")[-1]: f"{record[k]:.3f}" for k in HEADLINE if k in record}, refresh=False)
        if samples and transcripts:
            tqdm.write(eval_table(step, record))
            for text in transcripts[: self.log_samples]:
                tqdm.write("  | " + text.replace("\n", "\n  | "))

    def close(self) -> None:
        self.bar.close()
        self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One PNG with a panel per metric group of PLOTS that the run logged."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    panels = [(title, [k for k in keys if any(k in r for r in records)]) for title, keys in PLOTS]
    panels = [(title, keys) for title, keys in panels if keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            ax.plot(*zip(*points, strict=True), marker="o" if len(points) < 30 else None, ms=3, label=key.split("/")[-1])
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.suptitle(str(Path(run_dir).resolve().name))
    fig.tight_layout()
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
