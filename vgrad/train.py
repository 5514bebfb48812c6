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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

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
        "agc": lambda: optax.adaptive_grad_clip(cfg.clip_value),
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
        grad_norm = optax.global_norm(grads)
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
            "learning_rate": schedule(state.step),
            "finite": finite,
        }
        return kept.replace(step=state.step + 1), metrics

    return step


def make_train_step(model: LayeredModel, train_cfg: TrainConfig, *,
                    total_steps: int | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

    metrics: loss, accuracy, grad_norm (global, before clipping),
    block_grad_norms (L,), learning_rate, finite (bool).
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
    final: final test (and train-subset) metrics; per-seed lists when seeds > 1.
    status: "completed", "diverged" or "interrupted".
    """

    state: TrainState
    history: list[dict]
    final: dict
    status: str = "completed"


def fit(model: LayeredModel, train_cfg: TrainConfig, dataset: Any, *, run_dir: Any = None,
        seeds: int = 1, progress: bool = True, log_every: int = 1, mesh: Any = None) -> FitResult:
    """Train on ``dataset`` (a vgrad.data.Dataset) and evaluate on its test split.

    Runs ``total_steps(train_cfg, N_train)`` steps with deterministic batches
    (a function of seed and epoch), evaluates every ``train_cfg.eval_every``
    steps (0: every epoch) and at the end, shows a progress bar, and appends
    every record to ``run_dir/metrics.jsonl`` when ``run_dir`` is given.
    With ``seeds=N`` it trains seeds train_cfg.seed .. train_cfg.seed+N-1 in
    one vmapped step; records then carry a "seed" field each.
    On a non-finite step, ``train_cfg.on_nonfinite="stop"`` ends the run with
    status "diverged" (the state is the last good one); "skip" drops that update.
    ``mesh`` (a ``vgrad.parallel.data_mesh()``) shards the work over devices.
    """
    from tqdm.auto import tqdm

    from vgrad import data as vdata
    from vgrad.io import append_jsonl

    if seeds < 1:
        raise ValueError(f"invalid seeds={seeds!r}: must be an integer >= 1")
    num_train, batch_size = dataset.num_train, train_cfg.batch_size
    per_epoch = vdata.steps_per_epoch(num_train, batch_size)
    num_steps = total_steps(train_cfg, num_train)
    eval_every = train_cfg.eval_every or per_epoch
    x_train, y_train = jnp.asarray(dataset.x_train), jnp.asarray(dataset.y_train)
    x_test, y_test = jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test)
    seed_list = [train_cfg.seed + i for i in range(seeds)]

    step_fn, eval_fn = train_step_fn(model, train_cfg, total_steps=num_steps), eval_step_fn(model)
    init = lambda key: create_state(model, train_cfg, key, x_train[:batch_size], total_steps=num_steps)
    if seeds == 1:
        state = init(jax.random.key(train_cfg.seed))
        step, eval_step = jax.jit(step_fn, donate_argnums=0), jax.jit(eval_fn)
    else:
        state = jax.vmap(init)(seed_keys(train_cfg, seeds))
        step = jax.jit(jax.vmap(step_fn), donate_argnums=0)
        eval_step = jax.jit(jax.vmap(eval_fn, in_axes=(0, None)))
    if mesh is not None:
        from vgrad import parallel

        parallel.check_batch_divisible(mesh, batch_size, seeds)
        state = parallel.place_state(state, mesh, seeds)

    history: list[dict] = []
    metrics_path = None
    if run_dir is not None:
        metrics_path = Path(run_dir) / "metrics.jsonl"
        metrics_path.parent.mkdir(parents=True, exist_ok=True)

    def log(record: dict) -> None:
        # One record per seed, so single- and multi-seed files read the same way.
        for i, seed in enumerate(seed_list):
            row = {"step": record["step"], "seed": seed}
            row.update({k: (v[i] if seeds > 1 and np.ndim(v) > 0 else v)
                        for k, v in record.items() if k != "step"})
            row = {k: (np.asarray(v).tolist()) for k, v in row.items()}
            history.append(row)
            if metrics_path is not None:
                append_jsonl(metrics_path, row)

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

    status, last_eval = "completed", None
    first_step = int(np.asarray(state.step).reshape(-1)[0])
    bar = tqdm(total=num_steps, initial=first_step, disable=not progress, desc="train",
               dynamic_ncols=True)
    for s in range(first_step, num_steps):
        state, metrics = step(state, batch_at(s))
        m = as_numpy_metrics(metrics)
        if not m["finite"].all():
            if train_cfg.on_nonfinite == "stop":
                log({"step": s + 1, **{k: m[k] for k in ("loss", "grad_norm", "finite")}})
                bar.close()
                print(f"vgrad: non-finite loss or gradient at step {s + 1} "
                      f"({describe_nonfinite(m)}); stopping, state is from step {s}.")
                status = "diverged"
                break
        if (s + 1) % log_every == 0 or s + 1 == num_steps:
            log({"step": s + 1, "epoch": s // per_epoch, **m})
        if (s + 1) % eval_every == 0 and s + 1 != num_steps:
            last_eval = run_eval(s + 1)
        bar.update(1)
        bar.set_postfix(loss=f"{float(np.mean(m['loss'])):.4f}",
                        acc=f"{float(np.mean(m['accuracy'])):.3f}",
                        **({"test_acc": f"{float(np.mean(last_eval['test_accuracy'])):.3f}"}
                           if last_eval else {}))
    bar.close()

    done = int(np.asarray(state.step).reshape(-1)[0])
    final_test = run_eval(done)
    train_eval = evaluate(eval_step, state, x_train, y_train, batch_size)
    final = {"step": done, "test_loss": final_test["test_loss"],
             "test_accuracy": final_test["test_accuracy"],
             "train_loss": train_eval["loss"], "train_accuracy": train_eval["accuracy"]}
    final = {k: np.asarray(v).tolist() for k, v in final.items()}
    return FitResult(state=state, history=history, final=final, status=status)


def describe_nonfinite(metrics: dict) -> str:
    """Which part of the network first has a non-finite gradient (for error messages)."""
    norms = np.atleast_2d(metrics["block_grad_norms"])
    bad_blocks = np.nonzero(~np.isfinite(norms).all(axis=0))[0]
    where = f"first non-finite block gradient: block {bad_blocks[0] + 1}" if len(bad_blocks) \
        else "block gradients finite; the stem or head gradient or the loss is not"
    return f"loss={np.asarray(metrics['loss']).tolist()}, {where}"


def seed_keys(train_cfg: TrainConfig, seeds: int) -> jax.Array:
    """(N,) init keys for seeds train_cfg.seed .. train_cfg.seed + N - 1."""
    return jnp.stack([jax.random.key(train_cfg.seed + i) for i in range(seeds)])


def as_numpy_metrics(metrics: dict) -> dict:
    """Device metrics -> host numpy."""
    return {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
