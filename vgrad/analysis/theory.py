"""Mean-field signal propagation (Poole et al. 2016; Schoenholz et al. 2017).

For a wide plain network h^l = phi(z^l), z^l = W^l h^{l-1} + b^l with
W_ij ~ (0, weight_var / fan_in) and b_i ~ (0, bias_var), the pre-activation
variance obeys the length map

    q^l = weight_var * E_z[phi(sqrt(q^{l-1}) z)^2] + bias_var,   z ~ N(0, 1),

with fixed point q*, and the mean squared singular value of one block's
Jacobian diag(phi'(z)) W at the fixed point is

    chi1 = weight_var * E_z[phi'(sqrt(q*) z)^2].

Gradients therefore scale as ||P_l||_F^2 / n ~ chi1^(L - l): they vanish for
chi1 < 1, explode for chi1 > 1, over a depth scale 1/|log chi1|.

Gaussian expectations are computed in float64 with Gauss-Hermite quadrature
(``numpy.polynomial.hermite_e.hermegauss``, probabilists' weight exp(-z^2/2))
for smooth activations. For activations whose phi or phi' has kinks (relu,
leaky_relu, prelu, elu, selu, hard_tanh, softsign) a global polynomial rule
converges slowly, so the line is split at the kinks (in units of z: kink /
sqrt(q)) and each piece of [-12, 12] gets a Gauss-Legendre rule against the
normal density (mass outside is < 1e-32). Activations are evaluated with the
model's own ``activation_fn`` (prelu at its initial slope 0.25) and derivatives
with ``jax.grad``, so theory and model use the same functions.
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from numpy.polynomial.hermite_e import hermegauss
from numpy.polynomial.legendre import leggauss

from vgrad.config import ACTIVATIONS as _ACTIVATIONS
from vgrad.config import ModelConfig
from vgrad.models.activations import PRELU_INIT_SLOPE, activation_fn

NUM_HERMITE_POINTS = 200
NUM_LEGENDRE_POINTS = 64  # per piece
TAIL = 12.0
# q below Q_COLLAPSE counts as collapsed to 0, above Q_DIVERGE as diverged.
Q_COLLAPSE = 1e-30
Q_DIVERGE = 1e30
Q_MARGINAL = 1e-4  # below this fraction of q0 after max_iter: a marginal decay to 0
# chi1 at a collapsed / diverged fixed point is the limit q -> 0+ / q -> inf,
# evaluated at these q (they matter only for activations that are not
# positively homogeneous; for relu-like and linear ones chi1 is q-independent).
_Q_SMALL = 1e-24
_Q_LARGE = 1e24

# Pre-activation points where phi or phi' is not smooth.
_KINKS = {
    "relu": (0.0,), "leaky_relu": (0.0,), "prelu": (0.0,), "elu": (0.0,), "selu": (0.0,),
    "softsign": (0.0,), "hard_tanh": (-1.0, 1.0),
}


def _phi(activation: str, leaky_slope: float):
    return activation_fn(activation, leaky_slope=leaky_slope, prelu_slope=PRELU_INIT_SLOPE)


def _rule(activation: str, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nodes z and weights w with sum w g(z) ~= E_{z~N(0,1)}[g(z)] for g(z) = f(sqrt(q) z).

    Traceable in q: kinks outside [-TAIL, TAIL] (and all of them at q = 0) give
    zero-width pieces, which carry zero weight.
    """
    kinks = _KINKS.get(activation, ())
    if not kinks:
        nodes, weights = hermegauss(NUM_HERMITE_POINTS)
        return jnp.asarray(nodes), jnp.asarray(weights / math.sqrt(2 * math.pi))
    root_q = jnp.sqrt(q)
    breaks = jnp.asarray(sorted(kinks)) / jnp.where(root_q > 0, root_q, 1.0)
    breaks = jnp.where(root_q > 0, jnp.clip(breaks, -TAIL, TAIL), 0.0)
    edges = jnp.concatenate([jnp.asarray([-TAIL]), breaks, jnp.asarray([TAIL])])
    a, b = edges[:-1, None], edges[1:, None]
    x, w = leggauss(NUM_LEGENDRE_POINTS)
    z = 0.5 * (b - a) * jnp.asarray(x) + 0.5 * (a + b)
    weights = 0.5 * (b - a) * jnp.asarray(w) * jnp.exp(-0.5 * z**2) / math.sqrt(2 * math.pi)
    return z.ravel(), weights.ravel()


def _mean_sq(activation: str, leaky_slope: float, q: jax.Array, derivative: bool) -> jax.Array:
    """E_{z~N(0,1)}[phi(sqrt(q) z)^2] (or phi'), traceable in q."""
    phi = _phi(activation, leaky_slope)
    f = jax.vmap(jax.grad(phi)) if derivative else phi
    z, w = _rule(activation, q)
    return jnp.sum(w * f(jnp.sqrt(jnp.maximum(q, 0.0)) * z) ** 2)


@functools.lru_cache(maxsize=None)
def _mean_sq_fn(activation: str, leaky_slope: float, derivative: bool):
    return jax.jit(lambda q: _mean_sq(activation, leaky_slope, q, derivative))


@functools.lru_cache(maxsize=None)
def _iterate_fn(activation: str, leaky_slope: float):
    """Jitted fixed-point iteration of the length map: returns (q, status, iterations),
    status 0 = converged, 1 = collapsed, 2 = diverged, 3 = out of iterations."""

    def run(weight_var, bias_var, q0, tol, max_iter):
        def cond(state):
            _, status, it = state
            return (status < 0) & (it < max_iter)

        def body(state):
            q, _, it = state
            q_new = weight_var * _mean_sq(activation, leaky_slope, q, False) + bias_var
            status = jnp.where(~jnp.isfinite(q_new) | (q_new > Q_DIVERGE), 2,
                               jnp.where(q_new < Q_COLLAPSE, 1,
                                         jnp.where(jnp.abs(q_new - q) <= tol * q, 0, -1)))
            return q_new, status, it + 1

        q, status, it = jax.lax.while_loop(cond, body, (q0, jnp.asarray(-1), jnp.asarray(0)))
        return q, jnp.where(status < 0, 3, status), it

    return jax.jit(run)


def gaussian_mean_sq(activation: str, q: float, *, derivative: bool = False,
                     leaky_slope: float = 0.01) -> float:
    """E_{z~N(0,1)}[phi(sqrt(q) z)^2], or of phi' with ``derivative=True`` (float64)."""
    with jax.enable_x64(True):
        fn = _mean_sq_fn(activation, float(leaky_slope), bool(derivative))
        return float(fn(jnp.asarray(q, jnp.float64)))


def length_map(activation: str, q: float, weight_var: float, bias_var: float, *,
               leaky_slope: float = 0.01) -> float:
    """One step of the variance map q -> weight_var E[phi(sqrt(q) z)^2] + bias_var."""
    return weight_var * gaussian_mean_sq(activation, q, leaky_slope=leaky_slope) + bias_var


def q_star(activation: str, weight_var: float, bias_var: float, leaky_slope: float = 0.01, *,
           q0: float = 1.0, tol: float = 1e-10, max_iter: int = 100_000) -> float:
    """Fixed point of the length map, found by iterating from ``q0`` (= 1).

    Returns ``0.0`` if the iterates collapse below ``Q_COLLAPSE`` (e.g. relu with
    weight_var < 2 and bias_var = 0, where q shrinks geometrically) and
    ``math.inf`` if they exceed ``Q_DIVERGE`` (e.g. linear with weight_var > 1):
    then no finite positive fixed point is reachable from q0. Converged means
    |q_{t+1} - q_t| <= tol * q_t. If ``max_iter`` iterations do not converge,
    an iterate below ``Q_MARGINAL * q0`` is the slow (1/t) decay of a marginal
    case towards q* = 0 (e.g. tanh with weight_var = 1 and bias_var = 0) and
    gives 0.0; otherwise the last iterate is returned with a RuntimeWarning.
    """
    if weight_var <= 0 or bias_var < 0:
        raise ValueError(f"need weight_var > 0 and bias_var >= 0, got {weight_var}, {bias_var}")
    if activation not in _ACTIVATIONS:
        _phi(activation, leaky_slope)  # raises the standard ValueError
    with jax.enable_x64(True):
        f64 = lambda v: jnp.asarray(v, jnp.float64)
        q, status, _ = _iterate_fn(activation, float(leaky_slope))(
            f64(weight_var), f64(bias_var), f64(q0), f64(tol), jnp.asarray(max_iter))
        q, status = float(q), int(status)
    if status == 1:
        return 0.0
    if status == 2:
        return math.inf
    if status == 3 and q < Q_MARGINAL * q0:
        # Still decaying after max_iter and far below the start: the algebraic
        # (1/t) approach to q* = 0 of a marginal case, e.g. tanh at weight_var = 1.
        return 0.0
    if status == 3:
        warnings.warn(f"q_star({activation!r}, weight_var={weight_var}, bias_var={bias_var}) did "
                      f"not converge in {max_iter} iterations; returning the last iterate "
                      f"q={q:.3g}", RuntimeWarning, stacklevel=2)
    return q


def chi1(activation: str, weight_var: float, bias_var: float, leaky_slope: float = 0.01, *,
         q: float | None = None) -> float:
    """weight_var * E[phi'(sqrt(q*) z)^2]: the mean squared singular value of one
    block's Jacobian at the fixed point (or at the given pre-activation variance ``q``).

    At a collapsed (q* = 0) or diverged (q* = inf) fixed point it is the limit
    q -> 0+ or q -> inf (so relu gives weight_var / 2 in both cases).
    """
    if q is None:
        q = q_star(activation, weight_var, bias_var, leaky_slope)
    q_eval = min(max(q, _Q_SMALL), _Q_LARGE)
    return weight_var * gaussian_mean_sq(activation, q_eval, derivative=True,
                                         leaky_slope=leaky_slope)


def depth_scale(activation: str, weight_var: float, bias_var: float,
                leaky_slope: float = 0.01) -> float:
    """1 / |log chi1|: the number of blocks over which the mean squared gradient
    changes by a factor e (shrinks if chi1 < 1, grows if chi1 > 1); inf at chi1 = 1.
    For chi1 < 1 this is the usual -1/log(chi1)."""
    c = chi1(activation, weight_var, bias_var, leaky_slope)
    if c <= 0:
        return 0.0
    log_c = abs(math.log(c))
    return math.inf if log_c < 1e-12 else 1.0 / log_c  # 1e-12: quadrature round-off


def effective_weight_var(cfg: ModelConfig) -> float:
    """weight variance * fan_in of the block kernels drawn by ``cfg.init``.

    variance_scaling / orthogonal: cfg.weight_var; he_*: 2; lecun_normal: 1;
    glorot_*: 1 (fan_avg = fan_in, the block layers are square); uniform: 1/3;
    normal: init_std^2 * fan_in, fan_in = width (mlp) or kernel_size * width (conv).
    """
    fan_in = cfg.width * (cfg.kernel_size if cfg.arch == "conv" else 1)
    table = {
        "variance_scaling": cfg.weight_var, "orthogonal": cfg.weight_var,
        "he_normal": 2.0, "he_uniform": 2.0, "lecun_normal": 1.0,
        "glorot_uniform": 1.0, "glorot_normal": 1.0, "uniform": 1.0 / 3.0,
        "normal": cfg.init_std**2 * fan_in,
    }
    return float(table[cfg.init])


def predicted_log_product_sq_norms(cfg: ModelConfig, *,
                                   input_second_moment: float | None = None) -> np.ndarray:
    """Mean-field prediction of ``JacobianReport.log_product_sq_norms``, shape (L+1,).

    Without ``input_second_moment``: at the fixed point q*, log(chi1) * (L - l).
    With it (mean(h0**2), the per-unit second moment of the stem output h^0):
    the pre-activation variance is propagated block by block from the actual
    input, q_1 = weight_var * mean(h0**2) + bias_var, q_{k+1} = length_map(q_k),
    and log P_l = sum_{k=l+1..L} log chi(q_k), chi(q) = weight_var E[phi'(sqrt(q) z)^2].
    This also predicts the transient while q approaches q* (e.g. the slow
    1/k decay of q for tanh at weight_var = 1, bias_var = 0).

    Valid for plain blocks (Dense/Conv -> activation) in the wide limit, for a
    batch map without BatchNorm (block diagonal, so the per-example theory
    applies). Conv: ignores the zero padding at the sequence ends. Residual
    blocks and normalisation layers have no prediction of this form and raise
    ValueError.
    """
    if cfg.residual:
        raise ValueError("no mean-field prediction for residual blocks (residual=True)")
    if cfg.norm != "none":
        raise ValueError(f"no mean-field prediction with normalisation (norm={cfg.norm!r})")
    weight_var, bias_var, slope = effective_weight_var(cfg), cfg.bias_var, cfg.leaky_slope
    log = lambda c: math.log(c) if c > 0 else -math.inf
    if input_second_moment is None:
        log_chis = np.full(cfg.depth, log(chi1(cfg.activation, weight_var, bias_var, slope)))
    else:
        q, log_chis = weight_var * float(input_second_moment) + bias_var, []
        for _ in range(cfg.depth):
            log_chis.append(log(chi1(cfg.activation, weight_var, bias_var, slope, q=q)))
            q = length_map(cfg.activation, q, weight_var, bias_var, leaky_slope=slope)
        log_chis = np.asarray(log_chis)
    with np.errstate(invalid="ignore"):
        # out[l] = sum of log chi over blocks l+1..L; the last entry (P_L = I) is 0.
        return np.concatenate([np.cumsum(log_chis[::-1])[::-1], [0.0]])
