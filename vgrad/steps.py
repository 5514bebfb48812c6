"""Training state, optimiser (+ clipping) and the jitted train/eval steps.

The lowest layer of training (it imports nothing above it); :mod:`vgrad.loop`
runs these steps, and :mod:`vgrad.train` is the public face of both.

One jitted ``train_step(state, batch) -> (state, metrics)`` with the state
donated. The per-block weight-gradient norms come out of the same backward
pass as the update. The step never applies a non-finite update: if the loss,
any gradient, or any value of the updated state (parameters, optimiser state,
BatchNorm statistics) is NaN/Inf, the old state is kept and
``metrics["finite"]`` is False, so a state the loop holds is always finite.

The optimiser's numeric hyperparameters (learning rate, momentum, weight
decay, clip value; :data:`HYPERPARAMS`) live in the optimiser state
(``optax.inject_hyperparams``), not in the compiled program: runs that differ
only in them share one program, vmapped over a stacked state (see
:mod:`vgrad.loop` and :mod:`vgrad.sweep`), and changing a learning rate never
recompiles.

"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from vgrad import parallel
from vgrad.clipping import adaptive_grad_clip
from vgrad.config import BATCH_NORMS, TrainConfig
from vgrad.data import steps_per_epoch

Batch = dict[str, jax.Array]  # {"x": (B, ...), "y": (B,) int32}

# TrainConfig fields that are values in the optimiser state, not part of the program.
HYPERPARAMS = ("learning_rate", "momentum", "weight_decay", "clip_value")


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree).

    step: () int32 optimiser steps taken; the data position is derived from it.
    params / batch_stats: model variables (batch_stats is {} without BatchNorm).
    opt_state: optax state; ``opt_state.hyperparams`` holds the run's
        learning rate, momentum, weight decay and clip value.
    """

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any

    @property
    def variables(self) -> dict[str, Any]:
        return {"params": self.params, "batch_stats": self.batch_stats}


def hyperparams(cfg: TrainConfig) -> dict[str, float]:
    """The run's values of :data:`HYPERPARAMS`."""
    return {name: float(getattr(cfg, name)) for name in HYPERPARAMS}


def schedule_shape(cfg: TrainConfig, total_steps: int | None) -> optax.Schedule | None:
    """The learning-rate schedule divided by its peak (None for "constant")."""
    if cfg.schedule == "constant":
        return None
    if total_steps is None:
        raise ValueError(f"schedule={cfg.schedule!r} needs the run length: set steps or pass total_steps")
    if cfg.schedule == "cosine":
        return optax.cosine_decay_schedule(1.0, total_steps)
    warmup = min(cfg.warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total_steps, warmup + 1))


def make_schedule(cfg: TrainConfig, total_steps: int | None) -> optax.Schedule:
    """Learning rate as a function of the step."""
    shape = schedule_shape(cfg, total_steps)
    if shape is None:
        return optax.constant_schedule(cfg.learning_rate)
    return lambda count: cfg.learning_rate * shape(count)


def make_optimizer(cfg: TrainConfig, total_steps: int | None = None) -> optax.GradientTransformation:
    """Clipping (first, on the raw gradient) -> weight decay -> SGD/Adam -> schedule.

    The structure depends only on ``cfg.optimizer``, ``cfg.clip`` and the
    schedule; the values of :data:`HYPERPARAMS` are injected into the
    optimiser state. SGD always keeps a momentum trace (momentum 0 is plain
    SGD: the trace is then the gradient itself) and weight decay is always in
    the chain (0 adds nothing), so every run of a sweep has the same state
    structure. Weight decay is decoupled for Adam (AdamW) and added to the
    gradient for SGD.
    """
    shape = schedule_shape(cfg, total_steps)

    def factory(learning_rate, momentum, weight_decay, clip_value):
        clip = {
            "none": lambda: optax.identity(),
            "global_norm": lambda: optax.clip_by_global_norm(clip_value),
            "value": lambda: optax.clip(clip_value),
            "agc": lambda: adaptive_grad_clip(clip_value),
        }[cfg.clip]()
        if cfg.optimizer == "adam":
            core = [optax.scale_by_adam(), optax.add_decayed_weights(weight_decay)]
        else:
            core = [optax.add_decayed_weights(weight_decay), optax.trace(decay=momentum)]
        tail = [] if shape is None else [optax.scale_by_schedule(shape)]
        return optax.chain(clip, *core, optax.scale_by_learning_rate(learning_rate), *tail)

    return optax.inject_hyperparams(factory)(**hyperparams(cfg))


def total_steps(cfg: TrainConfig, num_train: int) -> int:
    """Steps of a run: ``cfg.steps`` if set, else epochs x full batches per epoch."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch(num_train, cfg.batch_size)


def create_state(model: Any, train_cfg: TrainConfig, key: jax.Array, example_x: jax.Array,
                 *, total_steps: int | None = None,
                 hparams: dict[str, Any] | None = None) -> TrainState:
    """Fresh state: model variables from ``key`` and the optimiser's initial state.

    ``hparams`` overrides the values of :data:`HYPERPARAMS` stored in the
    optimiser state (scalars, possibly traced: this is how a vmapped init gives
    every run of a group its own learning rate).
    """
    variables = model.init(key, example_x)
    tx = make_optimizer(train_cfg, total_steps)
    opt_state = tx.init(variables["params"])
    if hparams is not None:
        dtype = opt_state.hyperparams["learning_rate"].dtype
        opt_state.hyperparams.update({k: jnp.asarray(v, dtype) for k, v in hparams.items()})
    return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                      batch_stats=variables["batch_stats"], opt_state=opt_state)


def init_state(model: Any, train_cfg: TrainConfig, example_x: Any, *, seeds: int = 1,
               mesh: Any = None, total_steps: int | None = None) -> TrainState:
    """A fresh TrainState, seed-stacked along axis 0 when ``seeds > 1``.

    Seed i is initialised from ``jax.random.key(train_cfg.seed + i)``, as in
    ``vgrad.loop.fit``. Creation is jitted; with a ``mesh`` the state is
    created directly with its sharding (no host round trip, multi-host safe).
    ``example_x``: one batch of inputs, (B, ...), only its shape matters.
    """
    def init(key: jax.Array) -> TrainState:
        return create_state(model, train_cfg, key, example_x, total_steps=total_steps)

    fn = jax.vmap(init) if seeds > 1 else init
    keys = seed_keys(train_cfg, seeds) if seeds > 1 else jax.random.key(train_cfg.seed)
    out_shardings = parallel.state_sharding(mesh, seeds) if mesh is not None else None
    return jax.jit(fn, out_shardings=out_shardings)(keys)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy; logits (B, C), integer labels (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def scaled_norms(arrays: Sequence[jax.Array]) -> jax.Array:
    """L2 norm per row over several arrays that share their leading axis: (R, ...) each -> (R,).

    Scaled by the largest magnitude before squaring, so that norms of vanishing
    gradients are not lost: a plain sqrt(sum(g^2)) in float32 is exactly 0 once
    |g| < ~1e-19 (g^2 underflows), and overflows once |g| > ~1e19.
    """
    rows = [a.reshape(a.shape[0], -1) for a in arrays]
    scale = functools.reduce(jnp.maximum, [jnp.max(jnp.abs(r), axis=1) for r in rows])
    # A row of zeros has norm 0; a NaN or inf anywhere keeps the norm non-finite
    # (the step's finiteness checks read these norms).
    safe = jnp.where(scale == 0, 1.0, scale)[:, None]
    sq = sum(jnp.sum(jnp.square(r / safe), axis=1) for r in rows)
    return jnp.where(scale == 0, 0.0, scale * jnp.sqrt(sq))


def block_norms(tree: Any) -> jax.Array:
    """L2 norm per block of a params-shaped tree, shape (L,) (blocks are stacked on axis 0)."""
    return scaled_norms(jax.tree_util.tree_leaves(tree["blocks"]))


def part_norms(tree: Any) -> dict[str, jax.Array]:
    """L2 norm of every top-level part but the blocks: {"stem": (), "head": ()}."""
    return {name: scaled_norms([a[None] for a in jax.tree_util.tree_leaves(sub)])[0]
            for name, sub in tree.items() if name != "blocks"}


def all_finite(tree: Any) -> jax.Array:
    """() bool: every floating-point value of ``tree`` is finite."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree_util.tree_leaves(tree)
              if jnp.issubdtype(jnp.asarray(a).dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_step_fn(model: Any, train_cfg: TrainConfig, *,
                  total_steps: int | None = None) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The un-jitted step, for composing with vmap, scan and sharding.

    The learning rate, momentum, weight decay and clip value are read from
    ``state.opt_state.hyperparams``, so the function is the same for every run
    that shares ``train_cfg``'s optimizer, clip kind, schedule and batch size.
    """
    tx = make_optimizer(train_cfg, total_steps)
    shape = schedule_shape(train_cfg, total_steps)

    def loss_fn(params, batch_stats, batch):
        logits, new_stats = model.apply({"params": params, "batch_stats": batch_stats},
                                        batch["x"], train=True)
        return cross_entropy(logits, batch["y"]), (logits, new_stats)

    def step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        (loss, (logits, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.batch_stats, batch)
        updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
        grad_norm = optax.tree.norm(grads)
        candidate = state.replace(params=optax.apply_updates(state.params, updates),
                                  batch_stats=new_stats, opt_state=new_opt_state)
        # A finite gradient can still produce a non-finite update (a huge learning
        # rate or weight decay): the new state is checked too.
        update_finite = all_finite((candidate.params, candidate.batch_stats, candidate.opt_state))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & update_finite
        # Keep the last good state on a non-finite step (the loop decides whether to stop).
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), candidate, state)
        lr = state.opt_state.hyperparams["learning_rate"]
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["y"]),
            "grad_norm": grad_norm,
            "block_grad_norms": block_norms(grads),
            **{f"{name}_grad_norm": norm for name, norm in part_norms(grads).items()},
            "learning_rate": lr if shape is None else lr * shape(state.opt_state.count),
            "update_finite": update_finite,
            "finite": finite,
        }
        return kept.replace(step=state.step + 1), metrics

    return step


def make_train_step(model: Any, train_cfg: TrainConfig, *, total_steps: int | None = None,
                    seeds: int = 1, mesh: Any = None,
                    donate: bool = True) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """Jitted ``step(state, batch) -> (state, metrics)``; ``state`` is donated.

    metrics: loss, accuracy, grad_norm (global, before clipping),
    block_grad_norms (L,), stem_grad_norm, head_grad_norm, learning_rate,
    update_finite (the updated state is finite), finite (loss, every gradient
    and the updated state are finite; if not, the step kept the old params,
    batch_stats and optimizer state and only advanced ``step``).

    ``seeds > 1``: vmapped over a seed-stacked state, batches (N, B, ...).
    ``mesh``: partitioned over its devices (state and batch shardings as in
    :func:`vgrad.parallel.state_sharding` / :func:`vgrad.parallel.batch_sharding`;
    the outputs keep the state's sharding so steps chain without resharding).
    """
    step_fn = train_step_fn(model, train_cfg, total_steps=total_steps)
    if seeds > 1:
        step_fn = jax.vmap(step_fn)
    kwargs: dict[str, Any] = {"donate_argnums": 0} if donate else {}
    if mesh is not None:
        state_sh = parallel.state_sharding(mesh, seeds)
        # Per-seed metrics follow the seeds; scalar metrics of one seed are replicated.
        metrics_sh = state_sh if parallel.seed_axis_sharded(mesh, seeds) else parallel.replicated(mesh)
        kwargs.update(in_shardings=(state_sh, parallel.batch_sharding(mesh, seeds)),
                      out_shardings=(state_sh, metrics_sh))
    return jax.jit(step_fn, **kwargs)


def eval_step_fn(model: Any, *, train: bool = False) -> Callable[[TrainState, Batch], dict]:
    """Un-jitted evaluation of one batch: per-example losses (B,) and correct flags (B,)."""

    def step(state: TrainState, batch: Batch) -> dict:
        logits, _ = model.apply(state.variables, batch["x"], train=train)
        return {"losses": optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]),
                "correct": jnp.argmax(logits, -1) == batch["y"]}

    return step


def make_eval_step(model: Any, *, train: bool = False) -> Callable[[TrainState, Batch], dict]:
    """Jitted ``eval_step(state, batch) -> {"losses": (B,), "correct": (B,) bool}``.

    ``train=False`` uses the BatchNorm running averages; ``train=True`` the
    statistics of the evaluated batch itself (nothing is updated either way).
    """
    return jax.jit(eval_step_fn(model, train=train))


def evaluate(eval_step: Callable, state: TrainState, x: Any, y: Any, batch_size: int) -> dict:
    """Mean loss and accuracy over (x, y), in batches of ``batch_size``.

    Works for a single state (metrics are floats) and for a run-stacked state
    with a vmapped ``eval_step`` (metrics are arrays of shape (R,)). The sums
    are taken on the host in float64 over per-example values, so they do not
    depend on how the device program was batched or vmapped.
    """
    losses, correct = [], []
    for i in range(0, len(y), batch_size):
        out = eval_step(state, {"x": x[i:i + batch_size], "y": y[i:i + batch_size]})
        losses.append(out["losses"])
        correct.append(out["correct"])
    losses, correct = jax.device_get((losses, correct))
    losses = np.concatenate([np.asarray(a, np.float64) for a in losses], axis=-1)
    correct = np.concatenate([np.asarray(a) for a in correct], axis=-1)
    return {"loss": losses.mean(axis=-1), "accuracy": correct.mean(axis=-1)}


def _check_int(field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"invalid {field}={value!r}: must be an integer >= {minimum}")


def check_run(model: Any, train_cfg: TrainConfig, dataset: Any, *, seeds: int = 1) -> None:
    """Reject a run that cannot work, before anything is compiled or written.

    Raises ``ValueError`` naming the field and the reason for: invalid data
    (``dataset.validate()``: NaN/Inf inputs, labels out of range, ...), labels
    the model's head cannot represent, a batch size larger than the training
    set, and BatchNorm in training mode with one example per batch. Models
    without a ``cfg`` (your own, see ``vgrad.models.layered``) skip the checks
    that need one.
    """
    _check_int("seeds", seeds, 1)
    if hasattr(dataset, "validate"):
        dataset.validate()
    name = getattr(dataset, "name", "") or "dataset"
    num_train, batch_size = int(dataset.num_train), train_cfg.batch_size
    if batch_size > num_train:
        raise ValueError(f"invalid train.batch_size={batch_size}: larger than the {num_train} "
                         f"training examples of dataset {name!r}; use train.batch_size <= {num_train}")
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        return
    if int(dataset.num_classes) > cfg.num_classes:
        raise ValueError(f"invalid model.num_classes={cfg.num_classes}: dataset {name!r} has "
                         f"{dataset.num_classes} classes (labels up to {int(dataset.num_classes) - 1})")
    if cfg.norm in BATCH_NORMS and cfg.arch == "mlp" and batch_size == 1:
        raise ValueError(
            f"invalid train.batch_size=1 with model.norm={cfg.norm!r}: BatchNorm in training mode "
            "normalises every feature over the batch, and over one example the variance is 0, "
            "so every normalised output equals the BatchNorm bias and the input is ignored. "
            "Use train.batch_size >= 2, or model.norm='layer' or 'none'.")


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
    When every gradient is finite but the update is not, says so (a learning
    rate or weight decay too large for the parameters' float range).
    """
    loss = np.asarray(metrics["loss"], np.float64)
    parts = [f"loss={loss.tolist()}" + ("" if np.isfinite(loss).all()
                                        else " (the forward pass is already non-finite)")]
    layers = nonfinite_layers(metrics)
    if layers:
        parts.append(f"first non-finite gradient in backpropagation order: {layers[0]}")
        if len(layers) > 1:  # at most 8 names: a depth-1000 network would print a screenful
            named = ", ".join(layers[:8]) + (f", ... ({len(layers) - 8} more)" if len(layers) > 8 else "")
            parts.append(f"non-finite in {len(layers)} layers: {named}")
    else:
        parts.append("every layer's gradient norm is finite")
        if "update_finite" in metrics and not np.asarray(metrics["update_finite"]).all():
            parts.append("but the update made the parameters or optimiser state non-finite "
                         "(learning rate or weight decay too large?)")
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
