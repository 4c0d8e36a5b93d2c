"""User errors end in one `opd <command>: error: ...` line and exit code 2, before models load where they can (#17)."""

import shutil

import pytest

from opd.cli import main
from opd.models import TINY_DIR


@pytest.fixture()
def no_models(monkeypatch):
    import opd.train

    def refuse(*args, **kwargs):
        raise AssertionError("models were loaded before the input was checked")

    monkeypatch.setattr(opd.train, "load_models", refuse)


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("opd train: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_malformed_yaml_names_file_line_and_column(tmp_path, capsys, no_models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps: 3\nlr: [1e-4, 2\n")
    assert main(["train", str(recipe)]) == 2
    assert f"{recipe}:3:1: malformed YAML" in one_error_line(capsys)


def test_a_value_of_the_wrong_type_names_its_key_and_where_it_came_from(tmp_path, capsys, no_models):
    assert main(["train", "steps=abc"]) == 2
    assert "bad config: overrides: steps: Value 'abc' of type 'str' could not be converted to Integer" in \
        one_error_line(capsys)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lr: fast\n")
    assert main(["train", str(recipe)]) == 2
    assert f"bad config: recipe {recipe}: lr: Value 'fast'" in one_error_line(capsys)


def test_an_unusable_out_dir_is_one_line(tmp_path, capsys, no_models):
    (tmp_path / "file").write_text("")
    assert main(["train", f"out_dir={tmp_path / 'file' / 'run'}"]) == 2
    assert f"out_dir='{tmp_path / 'file' / 'run'}' cannot be used: Not a directory" in one_error_line(capsys)


def test_a_used_folder_and_another_runs_checkpoint_are_refused(tmp_path, capsys, no_models):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n')
    assert main(["train", f"out_dir={tmp_path}"]) == 2
    assert "already holds a run (metrics.jsonl); continue it with resume=true, or start over with overwrite=true" in \
        one_error_line(capsys)


def test_a_model_folder_without_weights_is_one_line(tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(TINY_DIR / "student", student)
    (student / "model.safetensors").unlink()
    assert main(["train", f"student={student}", f"out_dir={tmp_path / 'run'}", "progress=false"]) == 2
    assert str(student) in one_error_line(capsys)


def test_debug_shows_the_traceback(no_models):
    with pytest.raises(ValueError, match="steps"):
        main(["train", "steps=abc", "--debug"])
