"""How noisy are BatchNorm's batch statistics? Measured spread and the i.i.d. closed form.

BatchNorm normalises a unit with the mean and the (biased) variance of the
batch it sees, not with the population's. Over random batches of size B those
two statistics scatter around the population values; this module measures that
scatter and gives the closed form for i.i.d. samples beside it:

* ``batch_statistic_spread(h, batch_sizes, num_batches, key)``: for each batch
  size, ``num_batches`` random batches of the rows of ``h`` (N, C); per unit the
  std over batches of the batch mean / population std, of the batch variance /
  population variance, and the mean batch variance / population variance.
  With ``batch_fn`` the activations of a batch are computed *on that batch*
  (``batch_fn(fn_args, x_batch)``), e.g. the pre-BN activations of a deep layer,
  whose earlier BN layers also normalise with the batch's statistics.
* ``predicted_spread(batch_sizes, kurtosis)``: the same three numbers for B
  i.i.d. draws from a population of kurtosis kappa = E[(x-mu)^4] / sigma^4
  (3 for a Gaussian): std(mean)/sigma = 1/sqrt(B); for the unbiased sample
  variance s^2, Var(s^2) = sigma^4 (kappa - (B-3)/(B-1)) / B, and BatchNorm's
  biased variance v = (B-1)/B s^2 has std(v)/sigma^2 = (B-1)/B sqrt(Var(s^2))/sigma^2
  (= (B-1)/B sqrt(2/(B-1)) for Gaussian data) and mean (B-1)/B.
* ``pre_norm_activations(model, variables, x, train=...)``: the Dense outputs
  that a plain MLP's norm layers normalise, (L+1, B, width); ``PreNormLayers`` is
  some of them as a hashable ``batch_fn``.

Batches are drawn with replacement by default (i.i.d. draws from the N rows,
for which the closed form is exact with the population's moments); training
batches are drawn without replacement, which shrinks the spread of the mean by
sqrt((N-B)/(N-1)) (0.93 for B=512 of N=4000).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad.config import ModelConfig
from vgrad.models import build


def batch_moments(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-unit mean and biased variance over the batch axis, as BatchNorm computes them.

    a: (B, C) -> (mean (C,), var (C,)); var = mean(a^2) - mean(a)^2 clipped at 0 (Flax's form).
    """
    mean = jnp.mean(a, axis=0)
    var = jnp.maximum(jnp.mean(jnp.square(a), axis=0) - jnp.square(mean), 0.0)
    return mean, var


def _check_batch_sizes(batch_sizes: Sequence[int], population: int, replace: bool) -> list[int]:
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(isinstance(b, bool) or int(b) != b or b < 2 for b in batch_sizes):
        raise ValueError(f"invalid batch_sizes={list(batch_sizes)!r}: must be integers >= 2 "
                         "(a batch of one has no variance)")
    if not replace and max(sizes) > population:
        raise ValueError(f"invalid batch_sizes={sizes!r}: without replacement a batch holds at most "
                         f"the population's {population} rows")
    return sizes


def predicted_spread(batch_sizes: Sequence[int], kurtosis: Any = 3.0) -> dict[str, np.ndarray]:
    """The spread of the batch statistics for B i.i.d. draws (closed form, see the module doc).

    batch_sizes: K sizes B >= 2; kurtosis: scalar or (C,) array of kappa = E[(x-mu)^4]/sigma^4.
    Returns float64 arrays: "mean_spread" (K,) = 1/sqrt(B); "var_spread" (K, *kurtosis.shape)
    = std of the biased batch variance / sigma^2; "var_bias" (K,) = (B-1)/B, its mean / sigma^2.
    """
    b = np.asarray(_check_batch_sizes(batch_sizes, 0, True), np.float64)
    kappa = np.asarray(kurtosis, np.float64)
    shape = (-1,) + (1,) * kappa.ndim
    bk = b.reshape(shape)
    with np.errstate(invalid="ignore"):
        var_s2 = (kappa - (bk - 3) / (bk - 1)) / bk  # Var(s^2) / sigma^4
        var_spread = (bk - 1) / bk * np.sqrt(np.maximum(var_s2, 0.0))
    return {"mean_spread": 1 / np.sqrt(b), "var_spread": var_spread, "var_bias": (b - 1) / b}


@functools.partial(jax.jit, static_argnames=("batch_fn", "chunk"))
def _moments_of_batches(batch_fn: Callable | None, fn_args: Any, h: jax.Array, idx: jax.Array,
                        chunk: int) -> tuple[jax.Array, jax.Array]:
    """Batch means and variances (M, C) each of the M batches h[idx[m]] (idx (M, B))."""
    def one(rows):
        a = h[rows] if batch_fn is None else batch_fn(fn_args, h[rows])
        return batch_moments(a)

    # lax.map in chunks of batches: a deep layer's activations of all M batches at once
    # would not fit in memory, one batch at a time would be slow.
    return jax.lax.map(one, idx, batch_size=chunk)


@functools.partial(jax.jit, static_argnames=("batch_fn",))
def _apply(batch_fn: Callable, fn_args: Any, h: jax.Array) -> jax.Array:
    return batch_fn(fn_args, h)


def _draw(key: jax.Array, population: int, batch_size: int, num_batches: int,
          replace: bool) -> jax.Array:
    """(num_batches, batch_size) row indices; rows of one batch distinct unless ``replace``."""
    if replace:
        return jax.random.randint(key, (num_batches, batch_size), 0, population)
    keys = jax.random.split(key, num_batches)
    return jax.vmap(lambda k: jax.random.choice(k, population, (batch_size,), replace=False))(keys)


def batch_statistic_spread(h: Any, batch_sizes: Sequence[int], num_batches: int, key: jax.Array, *,
                           batch_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
                           fn_args: Any = None, replace: bool = True,
                           max_examples_at_once: int = 16384) -> dict[str, np.ndarray]:
    """Spread of the per-batch mean and variance of every unit around its population value.

    h: (N, C) per-example activations (the population), or, with ``batch_fn``,
        (N, ...) inputs whose activations ``batch_fn(fn_args, h_batch) -> (B, C)``
        are computed on each batch (``batch_fn`` must be hashable: it is a static
        argument of the compiled program, so pass the varying part in ``fn_args``,
        e.g. ``PreNormLayers(cfg, layers)`` with the model's variables).
    batch_sizes: K sizes B >= 2; num_batches: M random batches per size.
    replace: draw the rows of a batch with replacement (i.i.d.; the closed form is exact).
        The batches of size B are the first B rows of ``num_batches`` draws of the largest
        size: each size is a uniform draw, the sizes are not independent of each other.
    The population values are those of all N rows (with ``batch_fn``: computed as one batch).

    Returns float64 arrays (K = len(batch_sizes), C units):
      "batch_sizes" (K,);
      "mean_spread" (K, C): std over batches of the batch mean / population std;
      "var_spread" (K, C): std over batches of the batch variance / population variance;
      "var_bias" (K, C): mean over batches of the batch variance / population variance;
      "population_mean", "population_var", "kurtosis" (C,) (kurtosis E[(x-mu)^4]/sigma^4);
      "predicted_mean_spread" (K,), "predicted_var_spread" (K, C), "predicted_var_bias" (K,):
      :func:`predicted_spread` for the population's kurtosis.
    Units whose population variance is 0 get NaN.
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 2:
        raise ValueError(f"invalid num_batches={num_batches!r}: must be an integer >= 2")
    h = jnp.asarray(h)
    population = int(h.shape[0])
    sizes = _check_batch_sizes(batch_sizes, population, replace)
    pop = np.asarray(h if batch_fn is None else _apply(batch_fn, fn_args, h), np.float64)
    if pop.ndim != 2 or pop.shape[0] != population:
        raise ValueError(f"activations must have shape (N, C) with N={population} rows, got {pop.shape}")
    mu, var = pop.mean(0), pop.var(0)
    ok = var > 0
    safe_var = np.where(ok, var, 1.0)
    kurtosis = np.where(ok, np.mean((pop - mu) ** 4, 0) / safe_var**2, np.nan)
    out = {k: np.full((len(sizes), pop.shape[1]), np.nan) for k in ("mean_spread", "var_spread",
                                                                     "var_bias")}
    # One draw of the largest batches; a batch of size B is the first B rows of each (still a
    # uniform draw), so the sampling compiles once rather than once per batch size.
    rows = np.asarray(_draw(key, population, max(sizes), num_batches, replace))
    for i, b in enumerate(sizes):
        idx = jnp.asarray(rows[:, :b])
        chunk = max(1, min(num_batches, max_examples_at_once // b))
        means, vars_ = (np.asarray(a, np.float64)
                        for a in _moments_of_batches(batch_fn, fn_args, h, idx, chunk))
        out["mean_spread"][i] = np.where(ok, means.std(0, ddof=1) / np.sqrt(safe_var), np.nan)
        out["var_spread"][i] = np.where(ok, vars_.std(0, ddof=1) / safe_var, np.nan)
        out["var_bias"][i] = np.where(ok, vars_.mean(0) / safe_var, np.nan)
    predicted = predicted_spread(sizes, kurtosis)
    return {"batch_sizes": np.asarray(sizes, np.float64), **out, "population_mean": mu,
            "population_var": var, "kurtosis": kurtosis,
            **{f"predicted_{k}": v for k, v in predicted.items()}}


def pre_norm_activations(model: Any, variables: dict, x: jax.Array, *, train: bool) -> jax.Array:
    """The inputs of the norm layers of a plain MLP (``ModelConfig(residual=False, arch="mlp")``).

    x: (B, ...) inputs. Returns (L+1, B, width): index 0 is the stem's Dense output
    x W_0 + b_0, index l (1..L) block l's Dense output h^{l-1} W_l + b_l, with the
    hidden states h of ``model.hidden_states(variables, x, train=train)`` (with BatchNorm
    and ``train=True`` every layer below uses the statistics of this batch).
    """
    cfg = model.cfg
    if cfg.arch != "mlp" or cfg.residual:
        raise ValueError("pre_norm_activations needs a plain MLP (arch='mlp', residual=False), got "
                         f"arch={cfg.arch!r}, residual={cfg.residual!r}")
    params = variables["params"]
    stem, blocks = params["stem"]["Dense_0"], params["blocks"]["block"]["layer_0"]["Dense_0"]
    hidden = model.hidden_states(variables, x, train=train)  # (L+1, B, width)
    z0 = x.reshape(x.shape[0], -1) @ stem["kernel"] + stem["bias"]
    zs = jnp.einsum("lbi,lij->lbj", hidden[:-1], blocks["kernel"]) + blocks["bias"][:, None, :]
    return jnp.concatenate([z0[None], zs], axis=0)


@dataclasses.dataclass(frozen=True)
class PreNormLayers:
    """``batch_fn`` for :func:`batch_statistic_spread`: the pre-norm activations of the
    layers ``layers`` (0 = stem, l = block l) of the plain MLP ``cfg`` side by side,
    (B, len(layers) * width) (layer ``layers[i]`` in columns i*width .. (i+1)*width - 1),
    computed on the batch, with BatchNorm in training mode when ``train``; ``fn_args``
    is the model's variables. Frozen (hashable by value): every call with the same
    config reuses one compiled program, and all layers cost one forward pass."""

    cfg: ModelConfig
    layers: tuple[int, ...] = (0,)
    train: bool = True

    def __post_init__(self):
        bad = [l for l in self.layers if isinstance(l, bool) or not isinstance(l, int)
               or not 0 <= l <= self.cfg.depth]
        if not self.layers or bad:
            raise ValueError(f"invalid layers={self.layers!r}: must be integers in [0, "
                             f"{self.cfg.depth}] (0 = stem, l = block l)")

    def __call__(self, variables: dict, x: jax.Array) -> jax.Array:
        z = pre_norm_activations(build(self.cfg), variables, x, train=self.train)
        return jnp.concatenate([z[l] for l in self.layers], axis=-1)
