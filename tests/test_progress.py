"""Progress (``zoo.progress``): a line per tenth off a terminal, nothing with ZOO_PROGRESS=0 or progress=False,
only rank 0 under torchrun, and ``zoo predict`` showing it."""

from __future__ import annotations

import io

import pytest
from click.testing import CliRunner

from zoo import progress as zoo_progress
from zoo.progress import Progress, progress


class _Pipe(io.StringIO):
    def isatty(self):
        return False


def _run(n: int, **kwargs) -> list[str]:
    out = _Pipe()
    with Progress(n, "epoch 3/10", unit="batches", stream=out, delay=0, **kwargs) as bar:
        for i in range(n):
            bar.update(1, note=f"{i + 1} seen")
    return out.getvalue().splitlines()


def test_off_a_terminal_one_line_per_tenth_and_the_last_says_100():
    lines = _run(100)
    assert len(lines) == 10, lines
    assert lines[3] == "epoch 3/10: 40% (40/100 batches, 40 seen)"
    assert lines[-1].startswith("epoch 3/10: 100% (100/100 batches")


def test_fewer_steps_than_tenths_give_a_line_per_step():
    assert [line.split(":")[1].split("(")[0].strip() for line in _run(3)] == ["33%", "66%", "100%"]


def test_lines_can_go_to_a_log():
    lines = []
    with progress(20, "lr-find", unit="steps", log=lines.append, delay=0) as bar:
        bar.set(20)
    assert lines == ["lr-find: 100% (20/20 steps)"]


def test_a_quick_step_shows_nothing(monkeypatch, capsys):
    monkeypatch.delenv(zoo_progress.ENV, raising=False)
    with progress(100, "checking images", delay=60) as bar:
        bar.update(100)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("env, enabled, rank", [("0", None, "0"), ("off", True, "0"), ("", False, "0"), ("", None, "1")])
def test_off_by_environment_argument_or_rank(monkeypatch, capsys, env, enabled, rank):
    monkeypatch.setenv(zoo_progress.ENV, env)
    monkeypatch.setenv("RANK", rank)
    with progress(100, "predicting", enabled=enabled, delay=0) as bar:
        for _ in range(100):
            bar.update(1)
    assert capsys.readouterr().err == ""


def test_on_by_default_off_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(zoo_progress.ENV, raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with progress(10, "predicting", delay=0) as bar:
        bar.update(10)
    assert capsys.readouterr().err == "predicting: 100% (10/10 it)\n"


def test_the_ensemble_package_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, ensemble.fit, zoo.progress; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


@pytest.mark.slow
def test_zoo_predict_shows_progress_lines_off_a_terminal(tmp_path, monkeypatch):
    from finetune.train import finetune
    from tests.conftest import make_image_folder, tiny_config
    from zoo.cli import main

    data = make_image_folder(tmp_path / "data", per_class=(4, 2, 3))
    finetune(tiny_config(data, tmp_path / "run", epochs=1), progress=False, log=lambda m: None)
    monkeypatch.delenv(zoo_progress.ENV, raising=False)
    monkeypatch.setattr(zoo_progress, "DELAY_SECONDS", 0)
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "run"), "--data", str(data), "--split", "test",
                                       "--batch-size", "4", "--threads", "1",
                                       "--out", str(tmp_path / "test.safetensors")])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "checking images: 100% (9/9 images)" in lines, result.stderr
    assert "predicting with run: 100% (3/3 batches)" in lines, result.stderr
