"""The README's code is run, so the documentation cannot drift from the program.

Every fenced block is taken from README.md as it is: TOML blocks load as study files, Python blocks
run in a fresh interpreter, the error example is the error hpsearch prints, and every ``hpsearch``
command line in a shell block or in inline code parses against the real CLI (and the cheap ones
run). ``.ci/run`` runs the test-command block itself.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import optuna
import pytest
from click.testing import CliRunner

from conftest import write_study
from hpsearch.cli import main
from hpsearch.spec import load_spec

README = Path(__file__).resolve().parent.parent / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```$", TEXT, re.S | re.M)]


def blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCKS if kind == lang]


def test_the_readme_has_the_blocks_this_file_checks() -> None:
    assert len(blocks("toml")) == 1 and len(blocks("python")) == 2 and len(blocks("bash")) == 3
    assert len(blocks("")) == 1  # the error example


def test_the_study_file_example_loads(tmp_path: Path) -> None:
    (text,) = blocks("toml")
    spec = load_spec(write_study(tmp_path, "example", text))
    assert "optimizer.sgd.momentum" in spec.param_names()
    assert "scheduler.step.step_size" in spec.param_names()


def test_the_error_example_is_the_error_hpsearch_prints(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (example,) = blocks("")
    (studies := tmp_path / "studies").mkdir()
    write_study(
        studies,
        "x",
        '[data]\nname = "fashion_mnist"\n[model]\nname = "lenet"\n[optimizer]\nname = "sgd"\n'
        "[optimizer.sgd]\nmomentum = { low = 0.0, high = 0.9 }\nnesterov = { choices = [false, true] }\n",
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "--study", "studies/x.toml"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.strip() == example.strip()


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # a fresh interpreter imports torch
def test_the_adding_a_model_example_registers_a_model_a_study_can_use(tmp_path: Path) -> None:
    (code,) = [b for b in blocks("python") if "MODELS.register" in b]
    study = textwrap.dedent("""
        [study]
        n_trials = 2
        sampler = "grid"
        [data]
        name = "synthetic"
        batch_size = 100
        [model]
        name = "tiny_cnn"
        width = { choices = [16, 32] }
        [optimizer]
        name = "adam"
        lr = 0.003
        [train]
        epochs = 1
    """)
    (tmp_path / "tiny.toml").write_text(study, encoding="utf-8")
    use = textwrap.dedent("""
        import hpsearch
        spec = hpsearch.load_spec("tiny.toml")
        study = hpsearch.open_study(spec, "sqlite:///tiny.db")
        summary = hpsearch.run_study(spec, study, device="cpu")
        print(sorted(t.params["model.width"] for t in study.trials), summary.states["complete"])
    """)
    done = _python(code + use, tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[-2] == "[16, 32] 2"


@pytest.mark.slow
def test_the_library_example_and_the_best_then_run_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Both blocks run in this process, in a folder of their own: a fresh interpreter for each
    # would spend most of the test importing torch.
    monkeypatch.chdir(tmp_path)
    (code,) = [b for b in blocks("python") if "hpsearch.run_study" in b]
    exec(compile(code, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    assert "optimizer" in printed and "val_acc" in printed
    study = optuna.load_study(study_name="quickstart", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    assert len(study.trials) == 1 and study.trials[0].state.is_finished()
    # The shell block that retrains the best trial, line by line as a user would type it.
    (block,) = [b for b in blocks("bash") if "hpsearch best" in b]
    for line in block.strip().splitlines():
        command, _, target = line.partition(" > ")
        words = shlex.split(command)
        assert words[0] == "hpsearch", line
        result = CliRunner().invoke(main, words[1:])
        assert result.exit_code == 0, result.output
        if target:
            Path(target).write_text(result.stdout, encoding="utf-8")
    again = optuna.load_study(study_name="quickstart-best", storage=f"sqlite:///{tmp_path / 'hpsearch.db'}")
    (retrained,) = again.trials
    assert retrained.params == {} and retrained.user_attrs["seed"] == study.trials[0].user_attrs["seed"]
    assert retrained.user_attrs["train_loss"] == study.trials[0].user_attrs["train_loss"]


def _commands() -> list[list[str]]:
    """Every ``hpsearch`` command line in a shell block or in inline code, as argument lists."""
    lines = [line for _, body in BLOCKS for line in body.splitlines()]
    lines += re.findall(r"`([^`\n]*hpsearch [^`\n]+)`", TEXT)
    found = []
    for line in lines:
        # The command table writes NAME\|PATH (a Markdown table's escaped bar) for the study.
        for part in re.split(r"&&|>|\|", line.replace("NAME\\|PATH", "quickstart")):
            words = shlex.split(part)
            if words and Path(words[0]).name == "hpsearch" and len(words) > 1:
                found.append(words[1:])
    return found


def test_every_command_in_the_readme_parses() -> None:
    commands = _commands()
    assert len(commands) >= 10
    names = set(main.commands)  # type: ignore[attr-defined]
    for args in commands:
        args = [a.replace("NAME", "quickstart") for a in args]  # the command table's placeholder
        assert args[0] in names, args
        if len(args) == 1:  # prose naming a command ("the same `hpsearch run` on every machine")
            continue
        try:
            main.commands[args[0]].make_context(args[0], list(args[1:]))  # type: ignore[attr-defined]
        except click.UsageError as exc:
            raise AssertionError(f"{args}: {exc}") from None
