"""The metric tables (opd/report.py): what a run prints at each evaluation, and its before/after table."""

from opd.report import EVAL_ROWS, eval_table, summarize

HELD_OUT = {"eval/student_accuracy": 0.455, "eval/teacher_accuracy": 0.91, "eval/trace_gap": 0.255,
            "eval/trace_gap_pre_final": 0.308, "eval/trace_gap_final": 0.0, "eval/sampled_reverse_kl": 0.539,
            "eval/student_ppl": 1.8, "eval/teacher_ppl": 1.5, "eval/mean_length": 19.25,
            "eval/truncated_fraction": 0.0, "eval/teacher_truncated": 0.0}


def test_eval_table_is_one_aligned_row_per_metric():
    lines = eval_table(20, {"step": 20, **HELD_OUT, "train/loss": 0.3}).splitlines()
    assert lines[0].startswith("evaluation at step 20") and lines[0].endswith("held-out")
    assert len(lines) == 1 + len(EVAL_ROWS) and len({len(line) for line in lines}) == 1  # every column aligned
    assert lines[1].split()[-1] == "45.5%" and "0.2550" in lines[3] and "19.2" in lines[9]
    assert not any("loss" in line for line in lines)  # training metrics stay on the progress bar


def test_eval_table_adds_a_column_for_the_training_rows_and_skips_absent_metrics():
    record = {"eval/trace_gap": 0.25, "eval/sampled_reverse_kl": 0.5, "eval_train/trace_gap": 1.2}  # reward=none
    lines = eval_table(5, record).splitlines()
    assert lines[0].split()[-2:] == ["training", "rows"] and len(lines) == 3
    assert lines[1].split()[-2:] == ["0.2500", "1.2000"] and lines[2].split()[-2:] == ["0.5000", "-"]


def test_summarize_compares_the_first_and_last_evaluation_and_steps():
    records = [{"step": 0, "eval/trace_gap": 0.3}] + [
        {"step": s, "train/loss": 1.0, "opd/sampled_reverse_kl": 1.0 - s / 10} for s in range(1, 11)] + [
        {"step": 10, "eval/trace_gap": 0.1}]
    lines = summarize(records).splitlines()
    assert lines[1].split() == ["eval/trace_gap", "0.3000", "(step", "0)", "0.1000", "(step", "10)"]
    assert lines[2].split()[:2] == ["opd/sampled_reverse_kl", "0.7000"] and "0.2000" in lines[2]
