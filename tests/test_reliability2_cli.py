"""Reliability, round two: the command line (issue 9).

13. every bad input is one line ``vgrad: error: ...`` naming the flag as the
    user typed it, the value and the allowed values; 14. ``--help`` documents
    every field and lists allowed values, booleans accept true/false in any
    case, ``--version``; 15. the summary line, checkpoint loading and the
    checkpoint fallback print short, readable output.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
import warnings

import pytest

from vgrad import config as vconfig
from vgrad.cli import main
from vgrad.config import DataConfig, ModelConfig, TrainConfig

SYNTH = ["--data.name", "synthetic", "--data.options", "dim", "8", "num_train", "64",
         "num_test", "16", "num_classes", "4", "--model.num_classes", "4"]
TINY = [*SYNTH, "--model.depth", "2", "--model.width", "8", "--train.batch_size", "16",
        "--train.steps", "3", "--progress", "False"]


@pytest.fixture(autouse=True)
def wide_terminal(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


def _error_line(capsys, argv, out) -> str:
    try:
        rc = main([*argv[:1], "--out_dir", str(out), *argv[1:]])
    except SystemExit as exit_:  # today: tyro exits by itself
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err  # one line, not a box
    assert lines[0].startswith("vgrad: error: ") and "tyro" not in err and "Traceback" not in err
    assert not out.exists()  # nothing written
    return lines[0]


# ----------------------------------------------------------------------------
# 13. One line naming the flag as typed, the value and what is allowed
# ----------------------------------------------------------------------------

BAD = [
    (["--model.activation", "swish2"], "--model.activation='swish2'", vconfig.ACTIVATIONS),
    (["--model.norm", "group"], "--model.norm='group'", vconfig.NORMS),
    (["--model.init", "zeros"], "--model.init='zeros'", vconfig.INITS + ("xavier", "kaiming")),
    (["--train.optimizer", "lbfgs"], "--train.optimizer='lbfgs'", vconfig.OPTIMIZERS),
    (["--train.on_nonfinite", "ignore"], "--train.on_nonfinite='ignore'", vconfig.ON_NONFINITE),
    (["--data.name", "cifar10"], "--data.name='cifar10'", vconfig.DATASETS),
    (["--model.residual-scale", "huge"], "--model.residual-scale='huge'",
     ("finite number >= 0", "inv_sqrt_depth", "learnable_zero")),
    (["--model.depth", "0"], "--model.depth=0", (">= 1",)),
    (["--model.depth", "ten"], "--model.depth='ten'", ("an integer",)),
    (["--model.init_std", "nan"], "--model.init_std=nan", ("finite", "> 0")),
    (["--model.init-std", "-1"], "--model.init-std=-1.0", ("finite", "> 0")),
    (["--train.learning-rate", "inf"], "--train.learning-rate=inf", ("finite", "> 0")),
    (["--train.momentum", "1.5"], "--train.momentum=1.5", ("[0, 1)",)),
    (["--model.residual", "maybe"], "--model.residual='maybe'", ("true or false",)),
    (["--train.steps", "many"], "--train.steps='many'", ("an integer", "None")),
    (["--seeds", "0"], "--seeds=0", (">= 1",)),
    (["--keep-checkpoints", "0"], "--keep-checkpoints=0", (">= 1",)),
    (["--run_id", "../x"], "--run_id='../x'", ("a name, not a path",)),
    (["--resume", "true"], "--resume=True", ("--run-id",)),
    (["--model.depth"], "--model.depth", ("an integer",)),
    (["--model.actvation", "relu"], "--model.actvation", ("did you mean --model.activation",)),
    (["--model.num_classes", "10"], "--model.num_classes=10", ("has 4 classes",)),
]


@pytest.mark.parametrize("argv, named, allowed", BAD, ids=[" ".join(a) for a, _, _ in BAD])
def test_every_bad_input_is_one_line_naming_flag_value_and_allowed(tmp_path, capsys, argv, named,
                                                                   allowed):
    line = _error_line(capsys, ["train", *SYNTH, "--train.batch_size", "16", *argv],
                       tmp_path / "runs")  # everything else is valid
    assert named in line, line
    for value in allowed:
        assert value in line, line


def test_analyze_and_command_errors_are_one_line_too(tmp_path, capsys):
    line = _error_line(capsys, ["analyze", "--model.activation", "swish2"], tmp_path / "runs")
    assert "--model.activation='swish2': allowed values are linear" in line
    line = _error_line(capsys, ["analyze", "--num_probes", "0"], tmp_path / "runs")
    assert "--num_probes=0" in line
    for argv, needle in ((["trian"], "unknown command 'trian'"), ([], "train")):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and needle in err, err


# ----------------------------------------------------------------------------
# 14. --help documents every option; true/false; --version
# ----------------------------------------------------------------------------


def _help(capsys, command: str) -> str:
    try:
        rc = main([command, "--help"])
    except SystemExit as exit_:
        rc = exit_.code
    assert rc == 0
    return " ".join(capsys.readouterr().out.replace("│", " ").split())


@pytest.mark.parametrize("command", ["train", "analyze"])
def test_help_documents_every_field_and_lists_allowed_values(capsys, command):
    from vgrad.cli import field_docs

    text = _help(capsys, command)
    assert "``" not in text and "one of ACTIVATIONS" not in text
    for cls in (ModelConfig, TrainConfig, DataConfig):
        if command == "analyze" and cls is TrainConfig:
            continue
        prefix = {ModelConfig: "model", TrainConfig: "train", DataConfig: "data"}[cls]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert f"--{prefix}.{f.name.replace('_', '-')}" in text, f.name
            assert docs.get(f.name), f"no help for {prefix}.{f.name}"
            assert " ".join(docs[f.name].split())[:40] in text, f.name
    for choices in (vconfig.ACTIVATIONS, vconfig.INITS, vconfig.NORMS, vconfig.DATASETS,
                    vconfig.RESIDUAL_SCALES):
        for value in choices:
            assert value in text, value
    if command == "train":
        for choices in (vconfig.OPTIMIZERS, vconfig.SCHEDULES, vconfig.CLIPS, vconfig.ON_NONFINITE):
            for value in choices:
                assert value in text, value
    assert "{true,false}" in text


def test_every_cli_field_has_help_text():
    from vgrad.analysis.command import AnalyzeArgs
    from vgrad.cli import TrainArgs, cli_class

    def walk(cls):
        for name, hint in typing.get_type_hints(cli_class(cls), include_extras=True).items():
            helps = [getattr(m, "help", None) for m in getattr(hint, "__metadata__", ())]
            assert any(h and not h.endswith(f".{name}.") for h in helps), f"{cls.__name__}.{name}"
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(typing.get_type_hints(cls)[f.name]):
                walk(typing.get_type_hints(cls)[f.name])

    walk(TrainArgs)
    walk(AnalyzeArgs)


def test_booleans_accept_true_and_false_in_any_case_and_version(capsys):
    from vgrad import __version__
    from vgrad.cli import _parse

    for text, value in (("true", True), ("True", True), ("FALSE", False), ("false", False)):
        _, args = _parse(["train", "--model.residual", text, "--data.standardize", text])
        assert args.model.residual is value and args.data.standardize is value
        assert isinstance(args.model, ModelConfig)  # the real, validated config
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vgrad {__version__}"


# ----------------------------------------------------------------------------
# 15. Short output: summary line, checkpoint loading, checkpoint fallback
# ----------------------------------------------------------------------------


def test_summary_line_and_checkpoint_loading_are_quiet_and_readable(tmp_path, capsys, caplog):
    from vgrad.checkpoint import load_checkpoint, restore_model_config, restore_variables

    assert main(["train", "--out_dir", str(tmp_path), *TINY, "--run_id", "s"]) == 0
    out = capsys.readouterr().out
    summary = next(l for l in out.splitlines() if l.startswith("completed:"))
    for name in ("test accuracy", "test loss", "train accuracy"):
        value = re.search(rf"{name} ([-0-9.e+]+)", summary).group(1)
        digits = re.sub(r"e.*$", "", value).replace("-", "").replace(".", "").lstrip("0")
        assert len(digits) <= 4, summary  # e.g. 1.802, not 1.80195263671875
    run_dir = tmp_path / "train" / "s"
    with caplog.at_level(logging.DEBUG):
        restore_model_config(run_dir)
        restore_variables(run_dir)
        load_checkpoint(run_dir)
    assert not [r for r in caplog.records if "read only" in r.getMessage()]
    assert "read only" not in capsys.readouterr().err


def test_checkpoint_fallback_warning_is_one_line(tmp_path):
    from vgrad.checkpoint import warn_fallback

    spec = "{" + ", ".join(f'"k{i}": {{"driver": "file", "path": "/x/{i}"}}' for i in range(300)) + "}"
    err = ValueError(f"DATA_LOSS: Error reading \"state\" [tensorstore_spec='{spec}']\n" +
                     "\n".join(f"  at frame {i}" for i in range(120)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_fallback(7, err, tmp_path)
    message = str(caught[0].message)
    assert "\n" not in message and "tensorstore_spec" not in message and len(message) < 500
    assert 'DATA_LOSS: Error reading "state"' in message and "step 7" in message
