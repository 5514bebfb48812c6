"""The ``vgrad`` console script: ``vgrad train ...`` and ``vgrad analyze ...``.

Every config field is a flag, e.g.
``vgrad train --model.depth 200 --model.residual true --model.norm batch``
(``vgrad train --help`` lists them all, with their help and allowed values;
``vgrad --version`` prints the version). Parsing is done by tyro from the
config dataclasses themselves (their fields, types, defaults and docstrings),
so the CLI never drifts from the Python API.

Outcomes and exit status (``vgrad.io.EXIT_CODES``):

* 0 -- the run completed.
* 1 -- the run ended ``diverged`` or ``interrupted`` (Ctrl-C / SIGTERM at any
  time, including start-up: imports, data loading, compilation).
* 2 -- bad input: one line ``vgrad: error: ...`` naming the flag as typed, the
  value and what is allowed, before anything is written.
* 3 -- the environment failed mid-run (disk full, permission denied, out of
  memory, ...): ``results.json`` gets status ``failed`` and the one-line cause,
  everything saved so far is kept.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import logging
import re
import signal
import sys
import textwrap
import threading
import time
import typing
import warnings
from pathlib import Path
from typing import Any

from vgrad import config as vconfig
from vgrad.config import MAX_SEED, ConfigError, DataConfig, ModelConfig, TrainConfig


@dataclasses.dataclass(frozen=True)
class TrainArgs:
    """Train one model (or several seeds of it) and write runs/train/<run-id>/."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    seeds: int = 1
    """Train seeds train.seed .. train.seed+seeds-1 at once (vmapped)."""
    out_dir: str = "runs"
    """Root directory of results: the run is written to <out-dir>/train/<run-id>/."""
    run_id: str | None = None
    """Name of the run directory (default: a timestamp); a name, not a path."""
    log_every: int = 1
    """Write a train record to metrics.jsonl every this many steps."""
    progress: bool = True
    """Show a progress bar."""
    data_parallel: bool = False
    """Shard the batch (or, when seeds is a multiple of the device count, the seeds) over all
    devices with jax.sharding; multi-host jobs are initialised from the usual environment."""
    resume: bool = False
    """Continue the run out_dir/train/<run_id> from its latest checkpoint; needs --run-id and
    the run's original config (repeat the original command and add --resume true)."""
    checkpoint_every: int | None = 0
    """Checkpoint every this many steps as well as at the end of every epoch and of the run;
    0: only at epoch ends and the end; None: never (an interrupted run still saves one)."""
    keep_checkpoints: int = 3
    """Keep the last this many checkpoints."""
    tensorboard: str | None = None
    """Also write per-layer metrics as TensorBoard event files under this directory
    (one run per seed; needs the tensorboard extra)."""
    wandb_project: str | None = None
    """Also log per-layer metrics to this Weights & Biases project (one run per seed; needs
    the wandb extra; WANDB_MODE=offline writes locally)."""

    def __post_init__(self) -> None:
        def fail(field: str, value: Any, allowed: str) -> None:
            raise ConfigError(field, value, f"invalid {field}={value!r}: {allowed}")

        for name, minimum in (("seeds", 1), ("log_every", 1), ("keep_checkpoints", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(name, value, f"must be an integer >= {minimum}")
        every = self.checkpoint_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            fail("checkpoint_every", every, "must be an integer >= 0 (0: at epoch ends only) or "
                 "None (no periodic checkpoints)")
        for name in ("progress", "data_parallel", "resume"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be true or false")
        if self.run_id is not None:
            from vgrad import io

            try:
                io.check_run_id(self.run_id)
            except ValueError as err:
                raise ConfigError("run_id", self.run_id, str(err)) from None
        if self.resume and not self.run_id:
            raise ConfigError("resume", True, "invalid resume=True without run_id: --resume "
                              "continues an existing run, name it with --run-id (its directory "
                              "is <out-dir>/train/<run-id>)")
        if self.train.seed + self.seeds - 1 > MAX_SEED:
            fail("seeds", self.seeds, f"train.seed + seeds - 1 = {self.train.seed + self.seeds - 1} "
                 "exceeds 2**32 - 1, the largest JAX PRNG seed")


# Files whose presence means a directory already holds a run.
_RUN_FILES = ("config.json", "metrics.jsonl", "measurements.jsonl", "results.json", "checkpoints")


def _load_dataset(cfg: DataConfig):
    from vgrad import data as vdata

    try:
        return vdata.load_config(cfg)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        # A missing file is a bad input like any other: one clear line, no traceback.
        raise ValueError(f"cannot load dataset {cfg.name!r} (data.path={cfg.path!r}): {err}") from err


def _check_run_dir(args: TrainArgs, run_dir: Path) -> None:
    """Bad-input checks of the run directory (cheap; repeated under the lock)."""
    from vgrad import checkpoint as vckpt

    if args.resume:
        if not run_dir.is_dir():
            raise ValueError(f"invalid run_id={args.run_id!r}: cannot resume, {run_dir} does not exist")
        if not vckpt.committed_steps(vckpt.checkpoint_dir(run_dir)):
            raise ValueError(f"invalid run_id={args.run_id!r}: cannot resume, {run_dir} holds no "
                             "checkpoint (the run stopped before its first one, or the run id is "
                             "wrong); start it again without --resume")
    elif any((run_dir / f).exists() for f in _RUN_FILES):
        raise ValueError(f"invalid run_id={args.run_id!r}: {run_dir} already holds a run; add "
                         "--resume true to continue it, or choose another --run-id")


def _fmt(value: Any) -> str:
    """A metric for the summary line: 4 significant digits, per seed for lists."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def run_train(args: TrainArgs) -> dict:
    """Run ``vgrad train``: load data, fit, write config/metrics/results; return results.

    results.json: status ("completed", "diverged", "interrupted" or "failed"),
    message, final metrics, the config, seeds, the environment (package
    versions, JAX backend and devices), wall time, and checkpoint/resume
    information. Every file is written atomically.

    Order: everything is validated first (configs, data, the model against the
    data, the run directory, a resumed run's checkpoint and config); only then
    is the run directory locked (``vgrad.io.run_dir_lock``, held for the whole
    run, so a second process with the same run id fails at once) and written.
    Bad input raises ValueError before anything is written. A failure of the
    environment during the run (I/O, memory) gives status "failed" with the
    one-line cause in results.json (when the disk still allows it), keeping
    everything saved so far; Ctrl-C/SIGTERM gives status "interrupted".
    """
    from vgrad import checkpoint as vckpt
    from vgrad import io
    from vgrad.loop import fit
    from vgrad.writers import make_writers
    from vgrad.models import build
    from vgrad.steps import check_run

    dataset = _load_dataset(args.data)
    if dataset.num_classes != args.model.num_classes:
        raise ValueError(f"invalid model.num_classes={args.model.num_classes}: dataset "
                         f"{dataset.name!r} has {dataset.num_classes} classes")
    model = build(args.model)
    check_run(model, args.train, dataset, seeds=args.seeds)
    mesh = None
    if args.data_parallel:
        from vgrad import parallel

        parallel.maybe_initialize_distributed()
        mesh = parallel.data_mesh()
        parallel.check_batch_divisible(mesh, args.train.batch_size, args.seeds)

    run_dir = io.run_dir_path(args.out_dir, "train", args.run_id)
    io.check_run_dir_free(run_dir)  # in use by another process: say so, not "holds a run"
    _check_run_dir(args, run_dir)
    stored = {"model": args.model, "train": args.train, "seeds": args.seeds,
              "dataset": vckpt.dataset_fingerprint(dataset), "data": args.data}
    if args.resume:
        vckpt.check_resumable(run_dir, stored)
    seeds = [args.train.seed + i for i in range(args.seeds)]
    base = {"config": args, "seed": args.train.seed, "seeds": seeds, "run_dir": str(run_dir)}

    created = not run_dir.exists()
    try:
        with io.run_dir_lock(run_dir):
            _check_run_dir(args, run_dir)  # again: another process may have run meanwhile
            start = time.perf_counter()
            before = _stamp(run_dir / "metrics.jsonl")
            try:
                if not (args.resume and (run_dir / "config.json").exists()):
                    io.write_json(run_dir / "config.json", args)  # a resumed run keeps its original
                writers = make_writers(tensorboard=args.tensorboard, wandb_project=args.wandb_project,
                                       group=run_dir.name, config=args)
                try:
                    result = fit(model, args.train, dataset, run_dir=run_dir, seeds=args.seeds,
                                 progress=args.progress, log_every=args.log_every, mesh=mesh,
                                 checkpoint_every=args.checkpoint_every,
                                 keep_checkpoints=args.keep_checkpoints, resume=args.resume,
                                 run_config={"data": args.data}, writers=writers)
                finally:
                    for writer in writers:
                        writer.close()
                results = {"status": result.status, "message": result.message, "final": result.final,
                           **base, "resumed_from_step": result.resumed_from,
                           "checkpoint_steps": result.checkpoint_steps,
                           "wall_time_s": time.perf_counter() - start, "run_dir": str(run_dir),
                           "environment": io.environment_info()}
                io.write_json(run_dir / "results.json", results)
            except KeyboardInterrupt:  # a signal before the loop took over, or a second one
                return _stopped(run_dir, base, start, "interrupted")
            except Exception as err:
                if io.is_environment_error(err):
                    return _failed(run_dir, base, start, err)
                started = _stamp(run_dir / "metrics.jsonl") != before  # the loop got past its checks
                if isinstance(err, ValueError):
                    if not started:  # bad input the checks above did not catch: one line, exit 2
                        if not args.resume:  # ... and nothing written: take back our config.json
                            (run_dir / "config.json").unlink(missing_ok=True)
                        raise
                    return _failed(run_dir, base, start, err)  # e.g. orbax refusing a save mid-run
                io.write_failure(run_dir, err, {**base, "wall_time_s": time.perf_counter() - start})
                raise  # a bug: keep the traceback
    except ValueError:
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # bad input: leave no trace, not even an empty directory
        raise
    final = result.final
    if result.status == "interrupted":
        print(f"interrupted at step {final['step']}: {result.message}\nwrote {run_dir}")
    else:
        print(f"{result.status}: {final['step']} steps in {results['wall_time_s']:.1f}s | "
              f"test accuracy {_fmt(final['test_accuracy'])} | test loss {_fmt(final['test_loss'])} | "
              f"train accuracy {_fmt(final['train_accuracy'])}\nwrote {run_dir}")
    return results


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


def _checkpoint_steps(run_dir: Path) -> list[int]:
    from vgrad import checkpoint as vckpt

    try:
        return vckpt.committed_steps(vckpt.checkpoint_dir(run_dir))
    except OSError:
        return []


def _failed(run_dir: Path, base: dict, start: float, err: BaseException) -> dict:
    """Status "failed": the run failed mid-way, not because of its input (exit 3)."""
    from vgrad import io

    steps = _checkpoint_steps(run_dir)
    cause = io.describe_error(err)
    what = "the environment failed" if io.is_environment_error(err) else "an error occurred"
    results = {**base, "status": "failed", "message": f"{what} during the run: {cause}",
               "error_type": type(err).__name__, "checkpoint_steps": steps,
               "wall_time_s": time.perf_counter() - start}
    written = io.write_failure(run_dir, results["message"], results)
    kept = f"checkpoints kept: steps {steps}" if steps else "no checkpoint had been saved"
    print(f"vgrad: error: run failed (not bad input): {cause} | "
          f"{'results.json has status failed' if written else 'results.json could not be written either'}"
          f"; {kept}; resume with --resume true once fixed", file=sys.stderr, flush=True)
    return results


def _stopped(run_dir: Path, base: dict, start: float, status: str) -> dict:
    """Status "interrupted" by a signal the training loop did not handle (exit 1)."""
    from vgrad import io

    steps = _checkpoint_steps(run_dir)
    where = (f"checkpoints kept: steps {steps}; continue with --resume true" if steps
             else "no checkpoint was saved")
    results = {**base, "status": status, "message": f"interrupted by a signal; {where}",
               "checkpoint_steps": steps, "wall_time_s": time.perf_counter() - start}
    io.write_failure(run_dir, results["message"], results, status=status)
    print(f"vgrad: interrupted; {where} (in {run_dir})", file=sys.stderr, flush=True)
    return results


# ----------------------------------------------------------------------------
# The command line: tyro over mirrors of the config dataclasses
# ----------------------------------------------------------------------------

_CONFIG_CLASSES = (ModelConfig, TrainConfig, DataConfig)


def _expand_refs(text: str) -> str:
    """``ACTIVATIONS`` -> the values of vgrad.config.ACTIVATIONS; ``x`` -> x."""
    def sub(m: re.Match) -> str:
        value = getattr(vconfig, m.group(1), None)
        if isinstance(value, tuple):
            return ", ".join(map(str, value))
        return m.group(1)

    text = re.sub(r"``([A-Z][A-Z0-9_]*)``", sub, text)
    return re.sub(r"``([^`]+)``", r"\1", text)


def field_docs(cls: type) -> dict[str, str]:
    """Help text of every documented field of ``cls``: the string literal right
    under the field, else its ``name: text`` entry in the class docstring
    (``a / b: text`` documents both), with ``CONSTANT`` references expanded."""
    docs: dict[str, str] = {}
    current: list[str] = []
    entry = re.compile(r"^([a-z_][a-z0-9_]*(?:\s*/\s*[a-z_][a-z0-9_]*)*):\s+(.*)$")
    for line in (inspect.getdoc(cls) or "").splitlines():
        m = entry.match(line)
        if m:
            current = [n.strip() for n in m.group(1).split("/")]
            for name in current:
                docs[name] = m.group(2).strip()
        elif current and line.startswith(" ") and line.strip():
            for name in current:
                docs[name] += " " + line.strip()
        else:
            current = []
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError):
        body = []
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    for (owner, name), text in _EXTRA_HELP.items():
        if owner is cls and name not in docs:
            docs[name] = text
    return {k: _expand_refs(v) for k, v in docs.items()}


# Help for config fields their class docstring does not describe (the docstring,
# or a string literal under the field, takes precedence when there is one).
_EXTRA_HELP = {
    (ModelConfig, "num_classes"): "classes the head outputs (an integer >= 2); must equal the "
                                  "dataset's number of classes.",
    (ModelConfig, "leaky_slope"): "negative-side slope of leaky_relu (a finite number >= 0).",
    (ModelConfig, "init_std"): "std of init 'normal': weights N(0, init_std^2) (a finite number > 0).",
    (ModelConfig, "weight_var"): "weight variance sigma_w^2 of init 'variance_scaling' (N(0, "
                                 "weight_var / fan_in)) and 'orthogonal' (gain sqrt(weight_var)); "
                                 "a finite number > 0.",
    (ModelConfig, "bias_var"): "bias variance: biases are N(0, bias_var); 0 = zero biases "
                               "(a finite number >= 0).",
    (TrainConfig, "learning_rate"): "(peak) learning rate, a finite number > 0.",
    (TrainConfig, "momentum"): "SGD momentum in [0, 1); 0 = plain SGD.",
    (TrainConfig, "warmup_steps"): "steps of linear warm-up of schedule warmup_cosine (>= 0).",
    (TrainConfig, "batch_size"): "examples per step (>= 1, at most the training set).",
    (TrainConfig, "epochs"): "passes over the training set (>= 1); steps, when set, overrides it.",
    (TrainConfig, "clip_value"): "threshold of clip (a finite number > 0).",
    (TrainConfig, "seed"): "seed of initialisation and data order, 0 .. 2**32-1 (with --seeds N: "
                           "seed, seed+1, ..., seed+N-1).",
    (DataConfig, "path"): "the IDX directory or .npz file of mnist / fashion_mnist (read only, "
                          "nothing is downloaded).",
}


def field_choices(cls: type, name: str) -> tuple[str, ...] | None:
    """Allowed values of a string field of a config: vgrad.config's constant named
    after the field (``activation`` -> ``ACTIVATIONS``), with init's aliases."""
    if cls not in _CONFIG_CLASSES:
        return None
    if cls is ModelConfig and name == "init":
        return vconfig.INITS + tuple(vconfig.INIT_ALIASES)
    if cls is DataConfig and name == "name":
        return vconfig.DATASETS
    for const in (name.upper() + "S", name.upper()):
        value = getattr(vconfig, const, None)
        if isinstance(value, tuple) and value and all(isinstance(v, str) for v in value):
            return value
    return None


def _parse_bool(tokens: list[str]) -> bool:
    value = tokens[0].strip().lower()
    if value in ("true", "yes", "1"):
        return True
    if value in ("false", "no", "0"):
        return False
    raise ValueError(f"expected true or false, got {tokens[0]!r}")


def _bool_type() -> Any:
    from tyro.constructors import PrimitiveConstructorSpec

    spec = PrimitiveConstructorSpec(
        nargs=1, metavar="{true,false}", instance_from_str=_parse_bool,
        is_instance=lambda x: isinstance(x, bool),
        str_from_instance=lambda b: ["true" if b else "false"])
    return typing.Annotated[bool, spec]


_MIRRORS: dict[type, type] = {}


def cli_class(cls: type) -> type:
    """A validation-free copy of the dataclass ``cls`` for tyro: the same fields and
    defaults, each annotated with its help text, string choices as ``Literal``
    types (so ``--help`` lists them), and booleans that accept true/false in any
    case. Parsing into it never fails on a value; the real class then validates
    (see :func:`_from_cli`), so errors keep the house format."""
    if cls in _MIRRORS:
        return _MIRRORS[cls]
    import tyro

    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    default = cls()
    fields = []
    for f in dataclasses.fields(cls):
        typ, metavar = hints[f.name], None
        value = getattr(default, f.name)
        factory = None
        if dataclasses.is_dataclass(typ):
            docs.setdefault(f.name, _expand_refs((inspect.getdoc(typ) or "").split("\n\n")[0]))
            typ = cli_class(typ)
            factory = (lambda mirror, v: lambda: _to_cli(mirror, v))(typ, value)
        elif typ is bool:
            typ = _bool_type()
        else:
            choices = field_choices(cls, f.name)
            if choices and typ is str:
                typ = typing.Literal[choices]
            elif choices:  # e.g. residual_scale: a number or one of the names
                metavar = "FLOAT|{" + ",".join(choices) + "}"
        help_text = docs.get(f.name) or f"{cls.__name__}.{f.name}."
        arg = tyro.conf.arg(help=help_text, **({"metavar": metavar} if metavar else {}))
        spec = dataclasses.field(default_factory=factory) if factory else dataclasses.field(default=value)
        fields.append((f.name, typing.Annotated[typ, arg], spec))
    mirror = dataclasses.make_dataclass(cls.__name__, fields, frozen=True)
    mirror.__doc__ = _expand_refs((inspect.getdoc(cls) or cls.__name__).split("\n\n")[0])
    mirror.__module__ = __name__
    _MIRRORS[cls] = mirror
    return mirror


def _to_cli(mirror: type, obj: Any) -> Any:
    values = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _to_cli(cli_class(type(v)), v)
        values[f.name] = v
    return mirror(**values)


class UsageError(ValueError):
    """Bad command-line input, already phrased for the user (one line)."""


def _norm_flag(flag: str) -> str:
    return flag.split("=", 1)[0].replace("_", "-")


def _as_typed(flag: str, argv: list[str]) -> str:
    """``flag`` as the user wrote it on the command line (``--model.init_std`` or
    ``--model.init-std``), else tyro's spelling."""
    for token in argv:
        if token.startswith("--") and _norm_flag(token) == _norm_flag(flag):
            return token.split("=", 1)[0]
    return flag.split("=", 1)[0]


def _value_of(flag: str, argv: list[str]) -> str | None:
    """The value(s) typed after ``flag`` (the last occurrence)."""
    found = None
    for i, token in enumerate(argv):
        if token.startswith("--") and _norm_flag(token) == _norm_flag(flag):
            if "=" in token:
                found = token.split("=", 1)[1]
            else:
                rest = []
                for t in argv[i + 1:]:
                    if t.startswith("--"):
                        break
                    rest.append(t)
                found = " ".join(rest) if rest else None
    return found


def _reword(message: str, path: str, argv: list[str]) -> str:
    """``invalid <field>=...`` -> ``invalid --<path>=...`` with the flag as typed."""
    flag = _as_typed("--" + path.replace("_", "-"), argv)
    field = path.rsplit(".", 1)[-1]
    for old in (f"invalid {path}=", f"invalid {field}="):
        if message.startswith(old):
            return f"invalid {flag}=" + message[len(old):]
    return f"{flag}: {message}"


def _from_cli(cls: type, obj: Any, argv: list[str], prefix: str = "") -> Any:
    """The real (validated) ``cls`` from its tyro mirror ``obj``; a ConfigError is
    reworded to name the flag as typed (``invalid --model.activation='x': ...``)."""
    values = {}
    for f in dataclasses.fields(cls):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            target = typing.get_type_hints(cls)[f.name]
            v = _from_cli(target, v, argv, f"{prefix}{f.name}.")
        values[f.name] = v
    try:
        return cls(**values)
    except ConfigError as err:
        raise UsageError(_reword(str(err), prefix + err.field, argv)) from None


_DOTTED = re.compile(r"\binvalid ((?:model|train|data)\.[a-z_]+|seeds|run_id|out_dir|resume|"
                     r"log_every|checkpoint_every|keep_checkpoints|batch_size|num_probes|seed|"
                     r"checkpoint|override_model)=")


def _flagged(message: str, argv: list[str]) -> str:
    """Name config fields in a library error message as the flags the user typed."""
    m = _DOTTED.search(message)
    if not m:
        return message
    flag = _as_typed("--" + m.group(1).replace("_", "-"), argv)
    return message[:m.start(1)] + flag + message[m.end(1):]


def _describe_metavar(metavar: str) -> str:
    if " " in metavar:  # several values, e.g. --data.options KEY VALUE [KEY VALUE ...]
        return f"values of the form {metavar}"
    names = {"INT": "an integer", "FLOAT": "a number", "STR": "a string", "{None}": "None",
             "{true,false}": "true or false", "{True,False}": "true or false"}
    parts = []
    for part in re.split(r"\|(?![^{]*\})", metavar or ""):
        if part in names:
            parts.append(names[part])
        elif part.startswith("{") and part.endswith("}"):
            parts.append("one of " + ", ".join(part[1:-1].split(",")))
        elif part:
            parts.append(part)
    return " or ".join(parts) or "a valid value"


def _known_flags(command: str | None) -> list[str]:
    classes = {"train": TrainArgs, "analyze": _analyze_args()}
    flags: list[str] = []

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            typ = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(typ):
                walk(typ, f"{prefix}{f.name}.")
            else:
                flags.append("--" + (prefix + f.name).replace("_", "-"))

    for name, cls in classes.items():
        if command in (None, name):
            walk(cls, "")
    return sorted(set(flags))


def _analyze_args() -> type:
    from vgrad.analysis.command import AnalyzeArgs

    return AnalyzeArgs


def _event_message(event: Any, argv: list[str]) -> str:
    """One line for a tyro parse-error event."""
    kind = type(event).__name__
    command = next((t for t in argv if t in ("train", "analyze")), None)
    help_hint = f"vgrad {command} --help" if command else "vgrad --help"
    argument = getattr(event, "argument", None)
    flag = None
    if argument is not None:
        try:
            flag = _as_typed(list(argument.lowered.name_or_flags)[0], argv)
        except Exception:
            flag = None
    if kind == "InvalidChoice":
        return (f"invalid {flag or 'value'}={event.value!r}: allowed values are "
                + ", ".join(map(str, event.choices)))
    if kind == "InstantiationFailure" and flag:
        value = _value_of(flag, argv)
        metavar = getattr(argument.lowered, "metavar", "") or ""
        return f"invalid {flag}={value!r}: expected {_describe_metavar(str(metavar))}"
    if kind == "BadValue" and flag:
        metavar = getattr(argument.lowered, "metavar", "") or ""
        return f"missing value for {flag}: expected {_describe_metavar(str(metavar))}"
    if kind == "UnrecognizedArgs":
        tokens = list(event.tokens)
        if tokens and not tokens[0].startswith("-") and command is None:
            return f"unknown command {tokens[0]!r}: use 'vgrad train' or 'vgrad analyze'"
        options = [t for t in tokens if t.startswith("-")] or tokens
        known = _known_flags(command)
        hints = []
        for token in options:
            close = difflib.get_close_matches(_norm_flag(token), known, n=1, cutoff=0.6)
            hints.append(f"{token.split('=', 1)[0]}" + (f" (did you mean {close[0]}?)" if close else ""))
        return f"unrecognized option(s): {', '.join(hints)}; {help_hint} lists them all"
    if kind == "MissingSubcommand":
        found = getattr(event, "found_token", None)
        what = f"unknown command {found!r}" if found else "no command given"
        return f"{what}: use 'vgrad train ...' or 'vgrad analyze ...' (vgrad --help)"
    if kind == "MissingArgs":
        names = []
        for a in getattr(event, "missing_arguments", []):
            try:
                names.append(list(a.arg.lowered.name_or_flags)[0])
            except Exception:
                pass
        return f"missing required option(s) {', '.join(names) or '?'}; see {help_hint}"
    message = getattr(event, "message", "") or kind
    return f"invalid command line: {message.splitlines()[0]}; see {help_hint}"


def _parse(argv: list[str]) -> Any:
    """Parse ``argv`` with tyro into TrainArgs / AnalyzeArgs; bad input -> UsageError."""
    import contextlib
    import io as stdio

    import tyro

    commands = {"train": cli_class(TrainArgs), "analyze": cli_class(_analyze_args())}

    def hook(event: Any) -> None:
        raise UsageError(_event_message(event, argv))

    try:
        from tyro._errors import on_parse_error  # tyro >= 1.0: structured parse errors
        quiet = on_parse_error(hook)
        capture = None
    except ImportError:  # older tyro: flatten its error box into one line
        quiet, capture = contextlib.nullcontext(), stdio.StringIO()
    try:
        with quiet, (contextlib.redirect_stderr(capture) if capture else contextlib.nullcontext()):
            parsed = tyro.extras.subcommand_cli_from_dict(
                commands, prog="vgrad", args=argv, config=(tyro.conf.FlagConversionOff,),
                description="Train layered networks and measure how gradients flow through them "
                            "(vgrad --version: the version).")
    except SystemExit as exit_:
        if capture is not None and exit_.code not in (0, None):
            text = re.sub(r"[╭╮╰╯│─]+", " ", capture.getvalue())
            text = " ".join(text.split()).split("For full helptext")[0].strip()
            raise UsageError(text or "invalid command line; see vgrad --help") from None
        raise
    for name, mirror in commands.items():
        if isinstance(parsed, mirror):
            real = TrainArgs if name == "train" else _analyze_args()
            args = _from_cli(real, parsed, argv)
            if name == "analyze":  # only the --model.* flags typed can differ from a checkpoint
                from vgrad.analysis.command import with_model_fields

                typed = {_norm_flag(t)[len("--model."):].replace("-", "_") for t in argv
                         if _norm_flag(t).startswith("--model.")}
                args = with_model_fields(args, typed)
            return name, args
    raise UsageError("use 'vgrad train ...' or 'vgrad analyze ...'")


# ----------------------------------------------------------------------------
# Signals, warnings and logging of the command
# ----------------------------------------------------------------------------


class _Signals:
    """From the first line of :func:`main`: SIGINT and SIGTERM raise
    KeyboardInterrupt (once), so Ctrl-C or a scheduler's SIGTERM during start-up
    (imports, data loading, compilation) stops the command with a short message
    instead of a traceback or a silent death. The training loop installs its
    own handlers while it runs (finish the step, checkpoint) and restores these."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
            raise KeyboardInterrupt
        # Already stopping: let the clean-up (a few file operations) finish.

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal"

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)


class _OneLineLogs(logging.Filter):
    """Library errors logged by orbax/TensorStore (absl) or asyncio come with
    tracebacks hundreds of lines long, and the same error is logged by several
    threads: keep one line per distinct message (the command reports the cause)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        from vgrad.io import one_line

        if record.levelno < logging.ERROR:
            return True
        try:
            text = one_line(record.getMessage(), limit=300)
        except Exception:
            return True
        text = re.sub(r"^\[[^\]]*\](\[[^\]]*\])*\s*", "", text)
        if text in self.seen:
            return False
        self.seen.add(text)
        record.msg, record.args, record.exc_info, record.exc_text = text, None, None, None
        return True


def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None,
                  line: Any = None) -> None:
    print(f"vgrad: warning: {' '.join(str(message).split())}", file=file or sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The ``vgrad`` command. Returns the exit status (see the module docstring)."""
    with _Signals() as signals:
        try:
            code = _main(list(sys.argv[1:] if argv is None else argv))
            if argv is None and code == 3:
                # The vgrad command after a failed run: exit now. orbax's background
                # threads of a failed save can otherwise hold the process for minutes.
                import os

                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
            return code
        except BrokenPipeError:  # e.g. `vgrad train --help | head`: the reader left
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            print(f"vgrad: interrupted by {signals.name}; stopped before writing any results",
                  file=sys.stderr, flush=True)
            return 1


def _main(argv: list[str]) -> int:
    from vgrad import __version__
    from vgrad.io import EXIT_CODES

    if argv[:1] in (["--version"], ["-V"]) or (len(argv) == 2 and argv[1] == "--version"):
        print(f"vgrad {__version__}")
        return 0
    loggers = [logging.getLogger(name) for name in ("absl", "asyncio")]
    one_line = _OneLineLogs()
    for logger in loggers:
        logger.addFilter(one_line)
    old_show = warnings.showwarning
    warnings.showwarning = _show_warning
    try:
        try:
            command, args = _parse(argv)
        except SystemExit as exit_:  # --help
            return exit_.code if isinstance(exit_.code, int) else 0
        try:
            if command == "train":
                result = run_train(args)
            else:
                from vgrad.analysis.command import analyze

                result = analyze(args)
        except UsageError as err:
            print(f"vgrad: error: {err}", file=sys.stderr)
            return EXIT_CODES["bad_input"]
        except ValueError as err:  # bad config values, data, run directory: one line
            from vgrad.io import one_line

            text = one_line(" ".join(str(err).split()), limit=4000)  # no TensorStore spec dumps
            print(f"vgrad: error: {_flagged(text, argv)}", file=sys.stderr)
            return EXIT_CODES["bad_input"]
        except OSError as err:  # the environment (disk, permissions), not the input
            from vgrad.io import describe_error

            print(f"vgrad: error: {describe_error(err)}", file=sys.stderr)
            return EXIT_CODES["failed"]
    except UsageError as err:
        print(f"vgrad: error: {err}", file=sys.stderr)
        return EXIT_CODES["bad_input"]
    finally:
        warnings.showwarning = old_show
        for logger in loggers:
            logger.removeFilter(one_line)
    status = result.get("status") if isinstance(result, dict) else None
    return EXIT_CODES.get(status, 0) if status is not None else 0


if __name__ == "__main__":
    sys.exit(main())
