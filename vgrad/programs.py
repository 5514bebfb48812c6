"""The compiled programs of a group of runs, and what they are keyed on.

A group's runs share one program: the model without its initialiser
(:func:`model_program`) and the optimiser structure, schedule, batch size and
run length (:func:`train_program`). The programs are ``chunk`` (up to K
training steps of all R runs, vmapped, inside one ``fori_loop``), ``init``
(the stacked initial states) and ``eval`` (per-example losses of all runs).
For vgrad's own models they are cached, so repeated runs, seeds and learning
rates of a config compile once.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vgrad import parallel
from vgrad.config import ModelConfig, TrainConfig, without_init
from vgrad.models.model import LayeredModel
from vgrad.steps import HYPERPARAMS, create_state, eval_step_fn, hyperparams, train_step_fn

# TrainConfig fields that are values, not program: the seed and the optimiser hyperparameters.
TRAIN_VALUE_FIELDS = ("seed",) + HYPERPARAMS


def model_program(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` without its init-only fields (:data:`vgrad.config.MODEL_INIT_FIELDS`):
    equal for two configs exactly when their models compute the same function of
    their variables."""
    return without_init(cfg)


def train_program(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the seed and hyperparameter values set to fixed values."""
    return dataclasses.replace(cfg, seed=0, learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                               clip_value=1.0)


def unstack(tree: Any, r: int) -> Any:
    """Run r of a run-stacked pytree (leading axis R)."""
    return jax.tree_util.tree_map(lambda a: a[r], tree)


def stack(trees: Sequence[Any]) -> Any:
    """Concatenate run-stacked pytrees along their leading axis."""
    return jax.tree_util.tree_map(lambda *a: jnp.concatenate(a), *trees)


# ----------------------------------------------------------------------------
# Compiled programs
# ----------------------------------------------------------------------------


def _chunk_program(model: Any, train_cfg: TrainConfig, num_steps: int | None, K: int, stop: bool):
    """``chunk(carry, x_train, y_train, idx_KxRxB, n) -> (carry, (metrics_Kx..., live_KxR))``.

    carry = (state stacked over R runs, alive (R,) bool). Runs ``n <= K``
    steps; step i uses batch ``x_train[idx[i]]`` (R, B, ...). ``live[i, r]``
    says run r was alive (not frozen) at step i; its metrics are then real.
    """
    step = train_step_fn(model, train_cfg, total_steps=num_steps)

    def one_run_step(state, batch):
        # XLA compiles a vmap over one run into other (equally valid) kernels than
        # the plain step; without vmap a lone run runs exactly the plain step.
        new, metrics = step(*unstack((state, batch), 0))
        return jax.tree_util.tree_map(lambda a: a[None], (new, metrics))

    def chunk(carry, x_train, y_train, idx, n):
        state, alive = carry
        vstep = one_run_step if alive.shape[0] == 1 else jax.vmap(step)
        example = {"x": x_train[idx[0]], "y": y_train[idx[0]]}
        shapes = jax.eval_shape(vstep, state, example)[1]
        buf = jax.tree_util.tree_map(lambda s: jnp.zeros((K, *s.shape), s.dtype), shapes)
        live = jnp.zeros((K, alive.shape[0]), bool)

        def body(i, c):
            state, alive, buf, live = c
            new, metrics = vstep(state, {"x": x_train[idx[i]], "y": y_train[idx[i]]})
            halt = alive & ~metrics["finite"] if stop else jnp.zeros_like(alive)
            freeze = ~alive | halt  # frozen runs keep their whole state, step included
            state = jax.tree_util.tree_map(
                lambda old, upd: jnp.where(freeze.reshape(-1, *[1] * (old.ndim - 1)), old, upd),
                state, new)
            buf = jax.tree_util.tree_map(lambda b, v: b.at[i].set(v), buf, metrics)
            return state, alive & ~halt, buf, live.at[i].set(alive)

        state, alive, buf, live = jax.lax.fori_loop(0, n, body, (state, alive, buf, live))
        return (state, alive), (buf, live)

    return chunk


def _jit_chunk(model, train_cfg, num_steps, K, stop, mesh, R):
    chunk = _chunk_program(model, train_cfg, num_steps, K, stop)
    if mesh is None:
        return jax.jit(chunk, donate_argnums=0)
    state_sh = parallel.state_sharding(mesh, R)
    rep = parallel.replicated(mesh)
    idx_sh = NamedSharding(mesh, P(None, parallel.DATA_AXIS) if parallel.seed_axis_sharded(mesh, R)
                           else P(None, None, parallel.DATA_AXIS))
    return jax.jit(chunk, donate_argnums=0, in_shardings=((state_sh, state_sh), rep, rep, idx_sh, rep),
                   out_shardings=((state_sh, state_sh), None))


def _jit_init(init_model, train_cfg, num_steps):
    def init(key, hparams, x):
        return create_state(init_model, train_cfg, key, x, total_steps=num_steps, hparams=hparams)

    return jax.jit(jax.vmap(init, in_axes=(0, 0, None)))


def _jit_eval(model):
    step = eval_step_fn(model)

    def evaluate_runs(state, batch):
        if jax.tree_util.tree_leaves(state)[0].shape[0] == 1:  # see one_run_step
            return jax.tree_util.tree_map(lambda a: a[None], step(unstack(state, 0), batch))
        # The batch is broadcast to every run (not in_axes=None): XLA then runs the
        # same batched matmuls as the training step rather than one wide matmul.
        runs = jax.tree_util.tree_leaves(state)[0].shape[0]
        batch = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (runs, *a.shape)), batch)
        return jax.vmap(step)(state, batch)

    return jax.jit(evaluate_runs)


@functools.lru_cache(maxsize=32)
def _cached(kind: str, model_cfg: ModelConfig, *args):
    model = LayeredModel(model_cfg)
    return {"chunk": _jit_chunk, "init": _jit_init, "eval": _jit_eval}[kind](model, *args)


def programs_cache_clear() -> None:
    """Forget the cached compiled programs (the next run compiles afresh)."""
    _cached.cache_clear()


def program(kind: str, model: Any, train_cfg: TrainConfig, num_steps: int, *args):
    """A compiled program: "chunk", "init" or "eval".

    Cached for vgrad's own models (pure functions of their configs), keyed on
    what the program depends on: the model program (the init fields too for
    "init"), the train program (not the hyperparameter values or the seed) and
    the run length only where a schedule that is not constant needs it. So
    repeated runs, seeds and learning rates of a config compile once.
    """
    if type(model) is not LayeredModel:
        if kind == "eval":
            return _jit_eval(model)
        return (_jit_chunk if kind == "chunk" else _jit_init)(model, train_cfg, num_steps, *args)
    if kind == "eval":
        return _cached("eval", model_program(model.cfg))
    steps_key = None if train_cfg.schedule == "constant" else num_steps
    cfg = model.cfg if kind == "init" else model_program(model.cfg)
    return _cached(kind, cfg, train_program(train_cfg), steps_key, *args)


def init_group(specs: Sequence[Any], num_steps: int, example_x: np.ndarray):
    """The initial states of a group's runs, stacked along a leading axis R.

    specs: one ``vgrad.loop.RunSpec`` per run (``init_model`` draws the
    variables from key(``train.seed``); ``train`` gives the hyperparameter
    values stored in the optimiser state). Runs with the same init model share
    one vmapped init. example_x: (B, ...) one batch of inputs (its shape)."""
    template = specs[0].train
    order, parts = [], []
    by_model: dict[int, list[int]] = {}
    for i, spec in enumerate(specs):
        by_model.setdefault(id(spec.init_model), []).append(i)
    for members in by_model.values():
        init_model = specs[members[0]].init_model
        init = program("init", init_model, template, num_steps)
        keys = jnp.stack([jax.random.key(specs[i].train.seed) for i in members])
        hp = {k: jnp.asarray([hyperparams(specs[i].train)[k] for i in members], jnp.float32)
              for k in HYPERPARAMS}
        parts.append(init(keys, hp, jnp.asarray(example_x)))
        order += members
    state = stack(parts)
    if order != sorted(order):
        inverse = np.argsort(order)
        state = jax.tree_util.tree_map(lambda a: a[inverse], state)
    return state

