"""Training: state, optimiser (+ clipping), jitted train/eval steps, the fit loop.

One jitted ``train_step(state, batch) -> (state, metrics)`` with the state
donated. The per-block weight-gradient norms come out of the same backward
pass as the update. The step never applies a non-finite update: if the loss or
any gradient is NaN/Inf the old state is kept (and ``metrics["finite"]`` is
False), so the state held by the loop is always the last good one.

Several seeds train at once by ``jax.vmap`` over a stacked state (``seeds=N``
in :func:`fit`); seed i uses ``train_cfg.seed + i`` for both its
initialisation and its data order, so it reproduces the single-seed run.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from vgrad.clipping import adaptive_grad_clip
from vgrad.config import TrainConfig
from vgrad.models.model import LayeredModel

Batch = dict[str, jax.Array]  # {"x": (B, ...), "y": (B,) int32}


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree).

    step: () int32 optimiser steps taken; the data position is derived from it.
    params / batch_stats: model variables (batch_stats is {} without BatchNorm).
    opt_state: optax state.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def make_schedule(cfg: TrainConfig, total_steps: int | None) -> optax.Schedule:
    """Learning rate as a function of the step."""
    if cfg.schedule == "constant":
        return optax.constant_schedule(cfg.learning_rate)
    if total_steps is None:
        raise ValueError(f"schedule={cfg.schedule!r} needs the run length: set steps or pass total_steps")
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(cfg.learning_rate, total_steps)
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1))


def make_optimizer(cfg: TrainConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """Clipping (first, on the raw gradient) -> weight decay -> SGD/Adam."""
    clip = {
        "none": optax.identity,
        "global_norm": lambda: optax.clip_by_global_norm(cfg.clip_value),
        "value": lambda: optax.clip(cfg.clip_value),
        "agc": lambda: adaptive_grad_clip(cfg.clip_value),
    }[cfg.clip]()
    lr = make_schedule(cfg, total_steps)
    if cfg.optimizer == "adam":
        opt = optax.adamw(lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(lr)
        return optax.chain(clip, opt)
    decay = optax.add_decayed_weights(cfg.weight_decay) if cfg.weight_decay else optax.identity()
    return optax.chain(clip, decay, optax.sgd(lr, momentum=cfg.momentum or None))


def total_steps(cfg: TrainConfig, num_train: int) -> int:
    """Steps of a run: ``cfg.steps`` if set, else epochs x full batches per epoch."""
    from vgrad.data import steps_per_epoch

    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(num_train, cfg.batch_size)


def create_state(model: LayeredModel, train_cfg: TrainConfig, key: jax.Array, example_x: jax.Array,
                 *, total_steps: int | None = None) -> TrainState:
    """Fresh state: model variables from ``key`` and the optimiser's initial state."""
    variables = model.init(key, example_x)
    tx = make_optimizer(train_cfg, total_steps)
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=tx.init(variables["params"]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; logits (B, C), integer labels (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def block_norms(tree: Any) -> jax.Array:
    """L2 norm per block of a params-shaped tree, shape (L,) (blocks are stacked on axis 0)."""
    leaves = jax.tree_util.tree_leaves(tree["blocks"])
    sq = sum(jnp.sum(jnp.square(a).reshape(a.shape[0], -1), axis=1) for a in leaves)
    return jnp.sqrt(sq)


def part_norms(tree: Any) -> dict[str, jax.Array]:
    """L2 norm of every top-level part but the blocks: {"stem": (), "head": ()}."""
    return {name: optax.tree.norm(sub) for name, sub in tree.items() if name != "blocks"}


def train_step_fn(model: LayeredModel, train_cfg: TrainConfig, *,
                  total_steps: int | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted step, for composing with vmap / sharding (see vgrad.parallel)."""
    tx = make_optimizer(train_cfg, total_steps)
    schedule = make_schedule(train_cfg, total_steps)

    def loss_fn(params, batch_stats, batch):
        logits, new_stats = model.apply({"params": params, "batch_stats": batch_stats},
                                        batch["x"], train=True)
        return cross_entropy(logits, batch["y"]), (logits, new_stats)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        candidate = state.replace(params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=new_opt_state)
        # Keep the last good state on a non-finite step (the loop decides whether to stop).
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), candidate, state)
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            "grad_norm": grad_norm,
            "block_grad_norms": block_norms(grads),
            **{f"{name}_grad_norm": norm for name, norm in part_norms(grads).items()},
            "learning_rate": schedule(state.step),
            "finite": finite,
        }
        return kept.replace(step=state.step + 1), metrics

    return step


def make_train_step(model: LayeredModel, train_cfg: TrainConfig, *,
                    total_steps: int | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

    metrics: loss, accuracy, grad_norm (global, before clipping),
    block_grad_norms (L,), stem_grad_norm, head_grad_norm, learning_rate,
    finite (bool: loss and every gradient are finite; if not, the step kept
    the old params, batch_stats and optimizer state and only advanced ``step``).
    """
    return jax.jit(train_step_fn(model, train_cfg, total_steps=total_steps), donate_argnums=0)


def eval_step_fn(model: LayeredModel, *, train: bool = False) -> Callable[[TrainState, Batch], dict]:
    """Un-jitted evaluation of one batch: summed loss, correct count, count."""

    def step(state: TrainState, batch: Batch) -> dict:
        logits, _ = model.apply(state.variables, batch["x"], train=train)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        return {"loss_sum": losses.sum(), "correct": jnp.sum(jnp.argmax(logits, -1) == batch["y"]),
                "count": jnp.asarray(batch["y"].shape[0])}

    return step


def make_eval_step(model: LayeredModel, *, train: bool = False) -> Callable[[TrainState, Batch], dict]:
    """Jitted ``eval_step(state, batch) -> {loss_sum, correct, count}``.

    ``train=False`` uses the BatchNorm running averages; ``train=True`` the
    statistics of the evaluated batch itself (nothing is updated either way).
    """
    return jax.jit(eval_step_fn(model, train=train))


def evaluate(eval_step: Callable, state: TrainState, x: Any, y: Any, batch_size: int) -> dict:
    """Mean loss and accuracy over (x, y), in batches of ``batch_size``.

    Works for a single state (metrics are floats) and for a seed-stacked state
    with a vmapped ``eval_step`` (metrics are arrays of shape (N,)).
    """
    totals = None
    for i in range(0, len(y), batch_size):
        out = eval_step(state, {"x": x[i:i + batch_size], "y": y[i:i + batch_size]})
        totals = out if totals is None else jax.tree_util.tree_map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    return {"loss": totals["loss_sum"] / totals["count"], "accuracy": totals["correct"] / totals["count"]}


@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns.

    state: the final (last good) TrainState; seed-stacked with leading axis N when seeds > 1.
    history: every record written to metrics.jsonl, in order (train records have
        "loss", "accuracy", ...; eval records have "test_loss", "test_accuracy").
        A resumed run's history starts with the records of the run it continues.
    final: "completed" and "diverged" runs: final test (and train-set) metrics
        of the (last good) state, per-seed lists when seeds > 1. "interrupted"
        runs skip that evaluation: {"step", "last_train", "last_eval"} with the
        last logged records.
    status: "completed", "diverged" (a non-finite step with on_nonfinite="stop")
        or "interrupted" (SIGINT/SIGTERM).
    message: why a run did not complete ("" when it did).
    resumed_from: the checkpoint step a resumed run started from, else None.
    checkpoint_steps: steps of the checkpoints kept in run_dir/checkpoints.
    """

    state: TrainState
    history: list[dict]
    final: dict
    status: str = "completed"
    message: str = ""
    resumed_from: int | None = None
    checkpoint_steps: list[int] = dataclasses.field(default_factory=list)


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"invalid {field}={value!r}: must be an integer >= {minimum}")


def check_run(model: LayeredModel, train_cfg: TrainConfig, dataset: Any, *, seeds: int = 1) -> None:
    """Reject a run that cannot work, before anything is compiled or written.

    Raises ``ValueError`` naming the field and the reason for: invalid data
    (``dataset.validate()``: NaN/Inf inputs, labels out of range, ...), labels
    the model's head cannot represent, a batch size larger than the training
    set, and BatchNorm in training mode with one example per batch.
    """
    _check_int("seeds", seeds, 1)
    if hasattr(dataset, "validate"):
        dataset.validate()
    cfg = model.cfg
    name = getattr(dataset, "name", "") or "dataset"
    if int(dataset.num_classes) > cfg.num_classes:
        raise ValueError(f"invalid model.num_classes={cfg.num_classes}: dataset {name!r} has "
                         f"{dataset.num_classes} classes (labels up to {int(dataset.num_classes) - 1})")
    num_train, batch_size = int(dataset.num_train), train_cfg.batch_size
    if batch_size > num_train:
        raise ValueError(f"invalid train.batch_size={batch_size}: larger than the {num_train} "
                         f"training examples of dataset {name!r}; use train.batch_size <= {num_train}")
    if cfg.norm == "batch" and cfg.arch == "mlp" and batch_size == 1:
        raise ValueError(
            "invalid train.batch_size=1 with model.norm='batch': BatchNorm in training mode "
            "normalises every feature over the batch, and over one example the variance is 0, "
            "so every normalised output equals the BatchNorm bias and the input is ignored. "
            "Use train.batch_size >= 2, or model.norm='layer' or 'none'.")


class _InterruptFlag:
    """While active (main thread only), SIGINT and SIGTERM set ``signum`` instead
    of stopping the process, so the loop can finish its step and checkpoint; a
    second signal raises KeyboardInterrupt at once."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_InterruptFlag":
        import signal
        import threading

        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal
        import sys

        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\nvgrad: received {signal.Signals(signum).name}: stopping after the current step "
              "and saving a checkpoint (send it again to abort at once)", file=sys.stderr, flush=True)

    @property
    def name(self) -> str:
        import signal

        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __exit__(self, *exc: Any) -> None:
        import signal

        for sig, old in self._old.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old.clear()


def fit(model: LayeredModel, train_cfg: TrainConfig, dataset: Any, *, run_dir: Any = None,
        seeds: int = 1, progress: bool = True, log_every: int = 1, mesh: Any = None,
        checkpoint_every: int | None = None, keep_checkpoints: int = 3, resume: bool = False,
        run_config: dict | None = None, handle_signals: bool = True) -> FitResult:
    """Train on ``dataset`` (a vgrad.data.Dataset) and evaluate on its test split.

    Runs ``total_steps(train_cfg, N_train)`` steps with deterministic batches
    (a function of seed and epoch), evaluates every ``train_cfg.eval_every``
    steps (0: every epoch) and at the end, shows a progress bar, and appends
    every record to ``run_dir/metrics.jsonl`` when ``run_dir`` is given.
    With ``seeds=N`` it trains seeds train_cfg.seed .. train_cfg.seed+N-1 in
    one vmapped step; records then carry a "seed" field each.
    ``mesh`` (a ``vgrad.parallel.data_mesh()``) shards the work over devices.

    Failures (see docs/reliability.md):

    * Non-finite loss/gradient: ``train_cfg.on_nonfinite="stop"`` ends the run
      with status "diverged" and a message naming the step and the first layer
      (in backpropagation order) whose gradient is non-finite; the returned
      state is the last good one and existing checkpoints are kept. "skip"
      drops that update and goes on.
    * SIGINT (Ctrl-C) / SIGTERM (``handle_signals``): the current step
      finishes, a checkpoint is saved (when ``run_dir`` is given) and the run
      returns with status "interrupted"; a second signal aborts at once.

    Checkpoints (orbax, in ``run_dir/checkpoints``; needs ``run_dir``):
      checkpoint_every: None: none (except on an interrupt); 0: at the end of
        every epoch and of the run; N > 0: also every N steps.
      keep_checkpoints: keep the last k.
      resume: continue from the latest checkpoint in ``run_dir`` (same config,
        else ValueError naming the fields that differ); metrics.jsonl is cut
        back to the records written when that checkpoint was taken, so a
        resumed run ends with exactly the records, metrics and parameters of an
        uninterrupted one. Without ``resume``, metrics.jsonl is started afresh
        and a ``run_dir`` that already holds checkpoints is refused.
      run_config: extra JSON-able config (e.g. the data config) stored with the
        checkpoints and compared on resume, besides the model and train configs,
        ``seeds`` and a fingerprint of the dataset.
    """
    import sys
    import warnings

    from tqdm.auto import tqdm

    from vgrad import data as vdata
    from vgrad import io

    _check_int("log_every", log_every, 1)
    if checkpoint_every is not None:
        _check_int("checkpoint_every", checkpoint_every, 0)
    _check_int("keep_checkpoints", keep_checkpoints, 1)
    if run_dir is None and (resume or checkpoint_every is not None):
        raise ValueError("checkpointing and resume=True need run_dir (where checkpoints live)")
    check_run(model, train_cfg, dataset, seeds=seeds)

    num_train, batch_size = dataset.num_train, train_cfg.batch_size
    per_epoch = vdata.steps_per_epoch(num_train, batch_size)
    num_steps = total_steps(train_cfg, num_train)
    eval_every = train_cfg.eval_every or per_epoch
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    seed_list = [train_cfg.seed + i for i in range(seeds)]

    # The run directory: refuse a wrong resume before compiling anything.
    metrics_path = ckpt_dir = config = ckpt = None
    resumed_from: int | None = None
    if run_dir is not None:
        from vgrad import checkpoint as vckpt

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        metrics_path, ckpt_dir = run_dir / "metrics.jsonl", vckpt.checkpoint_dir(run_dir)
        config = vckpt.normalize_config({
            "model": model.cfg, "train": train_cfg, "seeds": seeds,
            "dataset": vckpt.dataset_fingerprint(dataset), **(run_config or {})})
        existing = vckpt.committed_steps(ckpt_dir)
        if resume and not existing:
            raise ValueError(
                f"cannot resume: no checkpoint in {ckpt_dir} (the run stopped before its first "
                "checkpoint, or the directory is wrong); start the run again without resume")
        if not resume and existing:
            raise ValueError(
                f"{run_dir} already holds the checkpoints of a run (steps {existing}); pass "
                "resume=True (--resume True) to continue it, or use a new run directory")
        if resume:
            ckpt = vckpt.RunCheckpointer(ckpt_dir, keep=keep_checkpoints, save_every=checkpoint_every)
            try:
                for step_no in reversed(existing):  # the newest checkpoint whose metadata reads back
                    try:
                        saved = ckpt.read_meta(step_no)
                    except Exception:
                        continue
                    vckpt.check_compatible(saved.get("config", {}), config, where=ckpt_dir)
                    break
            except BaseException:
                ckpt.close()
                raise

    init, step, eval_step = _jitted_fns(model, train_cfg, num_steps, seeds)
    keys = jax.random.key(train_cfg.seed) if seeds == 1 else seed_keys(train_cfg, seeds)
    state = init(keys, x_train[:batch_size])
    if mesh is not None:
        from vgrad import parallel

        parallel.check_batch_divisible(mesh, batch_size, seeds)
        state = parallel.place_state(state, mesh, seeds)

    history: list[dict] = []
    if resume:
        state, meta = _restore_latest(ckpt, state, config)
        resumed_from = int(meta["step"])
        records = io.read_jsonl(metrics_path)
        wanted = int(meta["num_records"])
        if len(records) < wanted:
            warnings.warn(f"{metrics_path} has {len(records)} records but the checkpoint at step "
                          f"{resumed_from} was taken after {wanted}; earlier records are missing",
                          RuntimeWarning, stacklevel=2)
        history = records[:wanted]
        io.write_jsonl(metrics_path, history)  # drop records written after the checkpoint
    elif metrics_path is not None:
        io.write_jsonl(metrics_path, [])

    def log(record: dict) -> None:
        # One record per seed, so single- and multi-seed files read the same way.
        for i, seed in enumerate(seed_list):
            row = {"step": record["step"], "seed": seed}
            row.update({k: (v[i] if seeds > 1 and np.ndim(v) > 0 else v)
                        for k, v in record.items() if k != "step"})
            row = {k: (np.asarray(v).tolist()) for k, v in row.items()}
            history.append(row)
            if metrics_path is not None:
                io.append_jsonl(metrics_path, row)

    permutations: dict[int, np.ndarray] = {}

    def batch_at(global_step: int) -> Batch:
        epoch, i = divmod(global_step, per_epoch)
        if epoch not in permutations:
            permutations.clear()
            permutations[epoch] = np.stack(
                [vdata.epoch_permutation(num_train, seed=s, epoch=epoch) for s in seed_list])
        idx = permutations[epoch][:, i * batch_size:(i + 1) * batch_size]
        idx = idx[0] if seeds == 1 else idx
        batch = {"x": x_train[idx], "y": y_train[idx]}
        if mesh is not None:
            from vgrad import parallel

            batch = parallel.place_batch(batch, mesh, seeds)
        return batch

    def run_eval(at_step: int) -> dict:
        test = evaluate(eval_step, state, x_test, y_test, batch_size)
        record = {"step": at_step, "test_loss": test["loss"], "test_accuracy": test["accuracy"]}
        log(record)
        return record

    last_saved = resumed_from

    def save(at_step: int) -> None:
        nonlocal ckpt, last_saved
        from vgrad import checkpoint as vckpt

        if ckpt is None:
            ckpt = vckpt.RunCheckpointer(ckpt_dir, keep=keep_checkpoints, save_every=checkpoint_every)
        io.fsync_path(metrics_path)  # the records this checkpoint counts are on disk first
        epoch, batch_in_epoch = divmod(at_step, per_epoch)
        ckpt.save(at_step, state, {
            "epoch": epoch, "batch_in_epoch": batch_in_epoch, "seed": train_cfg.seed,
            "seeds": seed_list, "num_records": len(history), "total_steps": num_steps,
            "input_dtype": str(np.asarray(dataset.x_train).dtype), "config": config})
        last_saved = at_step

    def wants_checkpoint(at_step: int) -> bool:
        if checkpoint_every is None:
            return False
        return (at_step % per_epoch == 0 or at_step == num_steps
                or (checkpoint_every > 0 and at_step % checkpoint_every == 0))

    status, message, last_eval = "completed", "", None
    first_step = int(np.asarray(state.step).reshape(-1)[0])
    done = first_step
    interrupts = _InterruptFlag(handle_signals)
    try:
        with interrupts:
            bar = tqdm(total=num_steps, initial=first_step, disable=not progress, desc="train",
                       dynamic_ncols=True)
            for s in range(first_step, num_steps):
                if interrupts.signum is not None:
                    break
                state, metrics = step(state, batch_at(s))
                m = as_numpy_metrics(metrics)
                done = s + 1
                if not m["finite"].all():
                    what = f"non-finite loss or gradient at step {done} ({describe_nonfinite(m, seed_list)})"
                    if train_cfg.on_nonfinite == "stop":
                        log({"step": done, **{k: m[k] for k in ("loss", "grad_norm", "finite")}})
                        kept = (f"; the last checkpoint (step {last_saved}) is kept"
                                if last_saved is not None and run_dir is not None else "")
                        message = f"{what}; stopped, the state is the last good one (step {s}){kept}"
                        status = "diverged"
                        bar.close()
                        print(f"vgrad: {message}", file=sys.stderr, flush=True)
                        break
                    bar.write(f"vgrad: {what}; update skipped (on_nonfinite='skip')", file=sys.stderr)
                if done % log_every == 0 or done == num_steps:
                    log({"step": done, "epoch": s // per_epoch, **m})
                if done % eval_every == 0 and done != num_steps:
                    last_eval = run_eval(done)
                if wants_checkpoint(done):
                    save(done)
                bar.update(1)
                bar.set_postfix(loss=f"{float(np.mean(m['loss'])):.4f}",
                                acc=f"{float(np.mean(m['accuracy'])):.3f}",
                                **({"test_acc": f"{float(np.mean(last_eval['test_accuracy'])):.3f}"}
                                   if last_eval else {}))
            bar.close()

            if status == "completed" and interrupts.signum is not None and done < num_steps:
                status = "interrupted"
                if run_dir is not None:
                    if done > 0 and last_saved != done:
                        save(done)
                    if ckpt is not None:
                        ckpt.wait()  # the checkpoint is complete before we report it
                    where = (f"checkpoint at step {last_saved} in {ckpt_dir}; continue with resume=True "
                             "(vgrad train ... --resume True)") if last_saved is not None \
                        else "no checkpoint (no step was taken)"
                else:
                    where = "nothing saved (no run_dir)"
                message = f"interrupted by {interrupts.name} at step {done} of {num_steps}; {where}"
                print(f"vgrad: {message}", file=sys.stderr, flush=True)
                final = _last_records(history, done, seeds)
            else:
                final_test = run_eval(done)
                train_eval = evaluate(eval_step, state, x_train, y_train, batch_size)
                final = {"step": done, "test_loss": final_test["test_loss"],
                         "test_accuracy": final_test["test_accuracy"],
                         "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"]}
                final = {k: np.asarray(v).tolist() for k, v in final.items()}
    finally:
        if ckpt is not None:
            ckpt.close()  # waits for a save in progress
    steps_kept = vckpt.committed_steps(ckpt_dir) if ckpt_dir is not None else []
    return FitResult(state=state, history=history, final=final, status=status, message=message,
                     resumed_from=resumed_from, checkpoint_steps=steps_kept)


def _jitted_fns(model: LayeredModel, train_cfg: TrainConfig, num_steps: int, seeds: int):
    """(init(keys, example_x), step, eval_step), jitted (vmapped over seeds when seeds > 1).

    Cached for vgrad's own models (a pure function of the configs), so
    repeated fits of one config (seed sweeps, resumed runs, tests) compile once.
    """
    if type(model) is LayeredModel:
        # Fields the compiled functions do not read are normalised out of the key
        # (the seed enters as the init key; eval_every and on_nonfinite are loop logic).
        key_cfg = dataclasses.replace(train_cfg, seed=0, eval_every=0, on_nonfinite="stop")
        key_steps = None if train_cfg.schedule == "constant" else num_steps
        return _jitted_fns_cached(model.cfg, key_cfg, key_steps, seeds)
    return _make_jitted_fns(model, train_cfg, num_steps, seeds)


@functools.lru_cache(maxsize=16)
def _jitted_fns_cached(model_cfg: Any, train_cfg: TrainConfig, num_steps: int | None, seeds: int):
    return _make_jitted_fns(LayeredModel(model_cfg), train_cfg, num_steps, seeds)


def _make_jitted_fns(model: LayeredModel, train_cfg: TrainConfig, num_steps: int | None, seeds: int):
    from vgrad.parallel import make_step

    eval_fn = eval_step_fn(model)
    step = make_step(model, train_cfg, seeds=seeds, total_steps=num_steps)
    # Init is one compiled program instead of every op dispatched eagerly (seconds for deep nets).
    init = lambda key, x: create_state(model, train_cfg, key, x, total_steps=num_steps)
    if seeds == 1:
        return jax.jit(init), step, jax.jit(eval_fn)
    return jax.jit(jax.vmap(init, in_axes=(0, None))), step, jax.jit(jax.vmap(eval_fn, in_axes=(0, None)))


def _restore_latest(ckpt: Any, state: TrainState, config: dict) -> tuple[TrainState, dict]:
    """Restore the newest checkpoint that reads back, falling back to older ones
    (with a warning) if the newest is damaged; an incompatible config is an error."""
    from vgrad import checkpoint as vckpt

    steps = ckpt.all_steps()
    errors = []
    for step in reversed(steps):
        try:
            meta = ckpt.read_meta(step)
        except Exception as err:  # damaged metadata: try an older checkpoint
            vckpt.warn_fallback(step, err, ckpt.directory)
            errors.append(f"step {step}: {type(err).__name__}: {err}")
            continue
        vckpt.check_compatible(meta.get("config", {}), config, where=ckpt.directory)
        try:
            return ckpt.restore(state, step)
        except Exception as err:  # damaged arrays: try an older checkpoint
            vckpt.warn_fallback(step, err, ckpt.directory)
            errors.append(f"step {step}: {type(err).__name__}: {err}")
    raise ValueError(f"cannot resume: none of the checkpoints in {ckpt.directory} could be "
                     f"restored ({'; '.join(errors)})")


def _last_records(history: list[dict], done: int, seeds: int) -> dict:
    """{"step", "last_train", "last_eval"}: the newest train and eval records (per seed)."""
    def newest(kind: str) -> Any:
        rows = [r for r in history if kind in r]
        if not rows:
            return None
        last = [r for r in rows if r["step"] == rows[-1]["step"]][-seeds:]
        return last[0] if seeds == 1 else last

    return {"step": done, "last_train": newest("loss"), "last_eval": newest("test_loss")}


def nonfinite_layers(metrics: dict) -> list[str]:
    """Layers whose gradient is non-finite, in backpropagation order (output to
    input: head, block L, ..., block 1, stem), for any seed of stacked metrics."""
    def bad(key: str) -> bool:
        return key in metrics and not np.isfinite(np.asarray(metrics[key], np.float64)).all()

    names = ["head"] if bad("head_grad_norm") else []
    norms = np.asarray(metrics["block_grad_norms"], np.float64)
    norms = norms.reshape(-1, norms.shape[-1])
    names += [f"block {l + 1}" for l in reversed(range(norms.shape[-1]))
              if not np.isfinite(norms[:, l]).all()]
    if bad("stem_grad_norm"):
        names.append("stem")
    return names


def describe_nonfinite(metrics: dict, seeds: list[int] | None = None) -> str:
    """Where a non-finite step went wrong, for error messages.

    Names the first layer in backpropagation order (the order gradients are
    computed, head to stem) whose gradient is non-finite: that is where the
    overflow or NaN starts, every layer after it in that order inherits it.
    """
    loss = np.asarray(metrics["loss"], np.float64)
    parts = [f"loss={loss.tolist()}" + ("" if np.isfinite(loss).all()
                                        else " (the forward pass is already non-finite)")]
    layers = nonfinite_layers(metrics)
    if layers:
        parts.append(f"first non-finite gradient in backpropagation order: {layers[0]}")
        if len(layers) > 1:
            parts.append(f"non-finite in {len(layers)} layers: {', '.join(layers)}")
    else:
        parts.append("every layer's gradient norm is finite")
    if seeds is not None and len(seeds) > 1:
        finite = np.asarray(metrics["finite"]).reshape(-1)
        parts.append(f"seeds affected: {[s for s, ok in zip(seeds, finite) if not ok]}")
    return "; ".join(parts)


def seed_keys(train_cfg: TrainConfig, seeds: int) -> jax.Array:
    """(N,) init keys for seeds train_cfg.seed .. train_cfg.seed + N - 1."""
    return jnp.stack([jax.random.key(train_cfg.seed + i) for i in range(seeds)])


def as_numpy_metrics(metrics: dict) -> dict:
    """Device metrics -> host numpy."""
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
