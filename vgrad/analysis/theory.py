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

Two depth scales (Schoenholz et al. 2017, "Deep Information Propagation"):

- the *gradient* depth scale ``depth_scale`` = 1/|log chi1|: over this many
  blocks the mean squared gradient changes by a factor e;
- the *correlation* depth scale ``correlation_depth_scale`` = xi_c = -1/log chi_c:
  over this many blocks the correlation c^l of two inputs' pre-activations
  approaches its fixed point c*, via the correlation map

    c^l = (weight_var * E[phi(u1) phi(u2)] + bias_var) / q*,
    u1 = sqrt(q*) z1,  u2 = sqrt(q*) (c^{l-1} z1 + sqrt(1 - c^{l-1}^2) z2),

  whose slope at c* is chi_c = weight_var * E[phi'(u1) phi'(u2)]. In the ordered
  phase (chi1 < 1) c* = 1 and chi_c = chi1 (so xi_c = the gradient depth scale);
  in the chaotic phase (chi1 > 1) c* < 1 and chi_c < 1; at the order-to-chaos
  transition chi_c -> 1 and xi_c diverges. Networks deeper than about 6 xi_c
  do not train (Schoenholz et al. 2017, Fig. 5).

Residual networks (``ModelConfig.residual_form == "preact"``, no
normalisation): block l maps h -> h + alpha F(h), F = phi -> Dense -> phi ->
Dense. The stream's per-unit second moment m grows as m + alpha^2 q3 (q3 the
branch output's variance) and, because the branch's last Dense is zero-mean
and independent of everything before it, each block multiplies the mean
squared singular value of the product by 1 + alpha^2 chi_branch, with
chi_branch = chi(m) chi(q2) from the branch's two layers (chi(q) = weight_var
E[phi'(sqrt(q) z)^2], q2 the variance at the second activation).

Gaussian expectations are computed in float64 with Gauss-Hermite quadrature
(``numpy.polynomial.hermite_e.hermegauss``, probabilists' weight exp(-z^2/2))
for smooth activations. For activations whose phi or phi' has kinks (relu,
leaky_relu, prelu, elu, selu, hard_tanh, softsign) a global polynomial rule
converges slowly, so the line is split at the kinks (in units of z: kink /
sqrt(q)) and each piece of [-12, 12] gets a Gauss-Legendre rule against the
normal density (mass outside is < 1e-32). Activations are evaluated with the
model's own ``activation_fn`` (prelu at its initial slope 0.25) and derivatives
with ``jax.grad``, so theory and model use the same functions. The 2-D
expectations of the correlation map nest two such rules (z2 inside z1), the
inner one split where u2 hits a kink (see ``_bivariate_mean``).
"""

from __future__ import annotations

import dataclasses
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
    return _shifted_rule(activation, 0.0, jnp.sqrt(q), NUM_HERMITE_POINTS, NUM_LEGENDRE_POINTS)


def _shifted_rule(activation: str, mean: jax.Array, std: jax.Array, num_hermite: int,
                  num_legendre: int, extra_breaks: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
    """Nodes z and weights w with sum w g(z) ~= E_{z~N(0,1)}[g(z)] for g(z) = f(mean + std z),
    f = phi or phi': Gauss-Hermite without kinks, else Gauss-Legendre pieces of
    [-TAIL, TAIL] split where mean + std z hits a kink. With ``extra_breaks``
    (values of z, any number, may be empty) the pieces are also split there and
    at ``_Z_BREAKS``, for the short pieces the 2-D rules use. Traceable in mean
    and std; shapes () -> (num_nodes,)."""
    kinks = _KINKS.get(activation, ())
    if not kinks:
        nodes, weights = hermegauss(num_hermite)
        return jnp.asarray(nodes), jnp.asarray(weights / math.sqrt(2 * math.pi))
    breaks = (jnp.asarray(sorted(kinks)) - mean) / jnp.where(std > 0, std, 1.0)
    breaks = jnp.where(std > 0, breaks, 0.0)
    if extra_breaks is not None:
        breaks = jnp.concatenate([breaks, extra_breaks, jnp.asarray(_Z_BREAKS)])
    # Out-of-range breaks give zero-width pieces at +-TAIL, which carry zero weight.
    edges = jnp.concatenate([jnp.asarray([-TAIL]), jnp.sort(jnp.clip(breaks, -TAIL, TAIL)),
                             jnp.asarray([TAIL])])
    a, b = edges[:-1, None], edges[1:, None]
    x, w = leggauss(num_legendre)
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
    q = _q_star_many(activation, np.asarray([weight_var], np.float64),
                     np.asarray([bias_var], np.float64), leaky_slope, q0=q0, tol=tol,
                     max_iter=max_iter, stacklevel=2)
    return float(q[0])


def _q_star_many(activation: str, weight_var: np.ndarray, bias_var: np.ndarray,
                 leaky_slope: float, *, q0: float = 1.0, tol: float = 1e-10,
                 max_iter: int = 100_000, stacklevel: int = 2) -> np.ndarray:
    """``q_star`` for equal-shaped 1-D arrays of weight_var and bias_var, in one
    vmapped, jitted fixed-point iteration; same conventions (0.0, inf, warning)."""
    with jax.enable_x64(True):
        f64 = lambda v: jnp.asarray(v, jnp.float64)
        run = jax.vmap(_iterate_fn(activation, float(leaky_slope)), in_axes=(0, 0, None, None, None))
        q, status, _ = run(f64(weight_var), f64(bias_var), f64(q0), f64(tol), jnp.asarray(max_iter))
        q, status = np.asarray(q, np.float64), np.asarray(status)
    # Still decaying after max_iter and far below the start: the algebraic (1/t)
    # approach to q* = 0 of a marginal case, e.g. tanh at weight_var = 1.
    marginal = (status == 3) & (q < Q_MARGINAL * q0)
    out = np.where((status == 1) | marginal, 0.0, np.where(status == 2, np.inf, q))
    for i in np.flatnonzero((status == 3) & ~marginal):
        warnings.warn(f"q_star({activation!r}, weight_var={weight_var[i]}, bias_var={bias_var[i]}) "
                      f"did not converge in {max_iter} iterations; returning the last iterate "
                      f"q={q[i]:.3g}", RuntimeWarning, stacklevel=stacklevel + 1)
    return out


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


@functools.lru_cache(maxsize=64)
def bn_gradient_growth(activation: str, leaky_slope: float = 0.01) -> float:
    """E[phi'(z)^2] / Var[phi(z)], z ~ N(0, 1): the factor by which the mean squared
    gradient grows per Dense -> BatchNorm -> phi layer of a deep plain network at
    initialisation, in the limit of a large, isotropic batch (each unit's normalised
    pre-activations are N(0, 1) over the batch). BatchNorm divides the backward signal by
    the batch std of W h, sqrt(weight_var Var[phi]), and the layer multiplies it by
    weight_var E[phi'^2], so weight_var cancels: no initialisation scale undoes it.
    ReLU: (1/2) / (1/2 - 1/(2 pi)) = pi / (pi - 1) ~ 1.467; linear: 1. Finite batches grow
    faster (Yang et al. 2019, "A Mean Field Theory of Batch Normalization": ~1.59 for ReLU
    at batch 16). Float64 quadrature, split at the activation's kinks."""
    with jax.enable_x64(True):
        phi = _phi(activation, leaky_slope)
        z, w = _rule(activation, jnp.asarray(1.0, jnp.float64))
        f, d = phi(z), jax.vmap(jax.grad(phi))(z)
        mean = jnp.sum(w * f)
        return float(jnp.sum(w * d**2) / (jnp.sum(w * f**2) - mean**2))


def depth_scale(activation: str, weight_var: float, bias_var: float,
                leaky_slope: float = 0.01) -> float:
    """The *gradient* depth scale 1 / |log chi1|: the number of blocks over which
    the mean squared gradient changes by a factor e (shrinks if chi1 < 1, grows
    if chi1 > 1); inf at chi1 = 1. For chi1 < 1 this is the usual -1/log(chi1).
    Not the correlation depth scale xi_c of Schoenholz et al. 2017, which is
    ``correlation_depth_scale`` (they coincide in the ordered phase only)."""
    c = chi1(activation, weight_var, bias_var, leaky_slope)
    if c <= 0:
        return 0.0
    log_c = abs(math.log(c))
    return math.inf if log_c < 1e-12 else 1.0 / log_c  # 1e-12: quadrature round-off


# The correlation map needs 2-D Gaussian expectations. A nested rule of these
# sizes agrees with the arc-cosine closed forms (relu family) to ~1e-14 and with
# adaptive integration (tanh, q ~ 1) to < 1e-9, and keeps a grid of 50 tanh
# networks x 60 bisection steps at a few hundredths of a second once compiled.
NUM_2D_HERMITE_POINTS = 96
NUM_2D_LEGENDRE_POINTS = 16  # per piece and dimension
# Fixed breaks of the 2-D rules' pieces, in z: short pieces follow the Gaussian
# weight with few nodes each (one piece over [kink, TAIL] would need ~4x more).
_Z_BREAKS = (-6.0, -3.0, -1.5, 0.0, 1.5, 3.0, 6.0)
CORRELATION_BISECTION_STEPS = 60  # bracket [0, 1] halved to 1e-18
_CHAOTIC_MARGIN = 1e-9  # slope of the correlation map at c = 1 above 1 + this: chaotic


def _bivariate_mean(activation: str, leaky_slope: float, q: jax.Array, c: jax.Array,
                    derivative: bool) -> jax.Array:
    """E[f(u1) f(u2)] with (u1, u2) centred Gaussian, variances q, correlation c,
    f = phi or phi' (``derivative``); traceable in q and c, scalars.

    Written as u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2): an outer
    rule over z1 and, for every outer node, an inner rule over z2 whose pieces
    split where u2 hits a kink (the kink line is not parallel to an axis).
    """
    phi = _phi(activation, leaky_slope)
    f = jax.vmap(jax.grad(phi)) if derivative else phi
    root_q = jnp.sqrt(jnp.maximum(q, 0.0))
    s = jnp.sqrt(jnp.maximum(1.0 - c * c, 0.0))
    # As a function of z1 the inner expectation changes over a width ~ s/|c| around
    # z1 = kink / (sqrt(q) c), where u2's kink crosses the middle of the inner
    # Gaussian: for c near 1 a feature far narrower than the outer pieces, so the
    # outer rule gets breaks there too.
    # (Smooth activations use Gauss-Hermite rules, which take no breaks.)
    kinks = jnp.asarray(sorted(_KINKS.get(activation, (0.0,))))
    safe_c = jnp.where(jnp.abs(c) > 1e-12, c, 1e-12)
    centre = kinks / jnp.where(root_q > 0, root_q, 1.0) / safe_c
    width = s / jnp.abs(safe_c)
    outer_breaks = (centre[:, None]
                    + width * jnp.asarray([-8.0, -3.0, -1.0, 0.0, 1.0, 3.0, 8.0])).ravel()
    z1, w1 = _shifted_rule(activation, 0.0, root_q, NUM_2D_HERMITE_POINTS, NUM_2D_LEGENDRE_POINTS,
                           extra_breaks=outer_breaks)

    def inner(z1_i):
        mean, std = root_q * c * z1_i, root_q * s
        z2, w2 = _shifted_rule(activation, mean, std, NUM_2D_HERMITE_POINTS,
                               NUM_2D_LEGENDRE_POINTS, extra_breaks=jnp.zeros((0,)))
        return jnp.sum(w2 * f(mean + std * z2))

    return jnp.sum(w1 * f(root_q * z1) * jax.vmap(inner)(z1))


@functools.lru_cache(maxsize=None)
def _bivariate_fn(activation: str, leaky_slope: float):
    """Jitted (q, c) -> (E[phi(u1) phi(u2)], E[phi'(u1) phi'(u2)]), one compile for both."""
    return jax.jit(lambda q, c: (_bivariate_mean(activation, leaky_slope, q, c, False),
                                 _bivariate_mean(activation, leaky_slope, q, c, True)))


def _normalised_map(activation: str, leaky_slope: float, weight_var, bias_var, q):
    """c -> (weight_var E[phi(u1) phi(u2)] + bias_var) / q', q' = length_map(q): the
    correlation of the next block's pre-activations; at a fixed point q' = q = q*."""
    q_next = weight_var * _mean_sq(activation, leaky_slope, q, False) + bias_var
    return lambda c: (weight_var * _bivariate_mean(activation, leaky_slope, q, c, False)
                      + bias_var) / q_next


@functools.lru_cache(maxsize=None)
def _correlation_fn(activation: str, leaky_slope: float):
    """Jitted, vmapped (weight_var, bias_var, q)[K] -> (c*, chi_c)[K], q the
    (finite, positive) pre-activation variance at which the map is taken."""

    def run(weight_var, bias_var, q):
        cmap = _normalised_map(activation, leaky_slope, weight_var, bias_var, q)
        q_next = weight_var * _mean_sq(activation, leaky_slope, q, False) + bias_var
        # Slope of the map at c = 1 (Price's theorem: d/dc E[phi phi] = q E[phi' phi']);
        # equals chi1 at a fixed point.
        slope_at_1 = weight_var * q * _mean_sq(activation, leaky_slope, q, True) / q_next

        # The map is a power series in c with non-negative coefficients (Hermite
        # expansion) plus bias_var / q', so g(c) = cmap(c) - c is convex on [0, 1]
        # with g(0) >= 0 and g(1) = 0: if g'(1) > 0 (chaotic) it has exactly one
        # more root c* in [0, 1), g >= 0 left of it and g < 0 right of it, which
        # bisection finds; otherwise c* = 1 is the only one (ordered).
        def halve(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            right = cmap(mid) - mid >= 0
            return jnp.where(right, mid, lo), jnp.where(right, hi, mid)

        zero = jnp.zeros_like(q)
        lo, hi = jax.lax.fori_loop(0, CORRELATION_BISECTION_STEPS, halve, (zero, zero + 1.0))
        c = jnp.where(slope_at_1 > 1.0 + _CHAOTIC_MARGIN, 0.5 * (lo + hi), 1.0)
        return c, weight_var * _bivariate_mean(activation, leaky_slope, q, c, True)

    return jax.jit(jax.vmap(run))


@dataclasses.dataclass(frozen=True)
class CorrelationFixedPoint:
    """Fixed point of the length and correlation maps, for each (weight_var, bias_var).

    Fields are floats for scalar inputs, else arrays of the broadcast input shape.
    q_star: the pre-activation variance (0.0 / inf where it collapses / diverges);
    c_star: the stable fixed point of the correlation map (1 in the ordered phase);
    chi_c: weight_var E[phi'(u1) phi'(u2)] at (q*, c*), the map's slope there;
    xi_c: the correlation depth scale -1/log(chi_c) (inf where chi_c >= 1).
    """

    q_star: float | np.ndarray
    c_star: float | np.ndarray
    chi_c: float | np.ndarray
    xi_c: float | np.ndarray


def correlation_fixed_point(activation: str, weight_var, bias_var,
                            leaky_slope: float = 0.01) -> CorrelationFixedPoint:
    """q*, c*, chi_c and xi_c (Schoenholz et al. 2017) by quadrature, vectorised.

    ``weight_var`` and ``bias_var`` are scalars or arrays (broadcast together);
    the whole grid is one jitted, vmapped computation (a 50-point grid of tanh
    networks takes a fraction of a second after the first compile). q* is
    found as by ``q_star``; c* by bisection of the correlation map on [0, 1]
    (see the module docstring); chi_c = weight_var E[phi'(u1) phi'(u2)] at
    (q*, c*), so chi_c = chi1 wherever c* = 1.

    Where q* collapses to 0 or diverges, the maps are taken in the limit
    q -> 0+ / inf (evaluated at 1e-24 / 1e24, as ``chi1`` does), with the
    correlation map normalised by the next variance q' instead of q*. Then
    c* = 1 wherever that map's slope at 1 is <= 1: e.g. relu without bias
    (c* = 1, chi_c = weight_var / 2 for every weight_var: correlations of a
    relu network converge to 1 only polynomially) and tanh with
    weight_var <= 1, bias_var = 0 (c* = 1, chi_c = weight_var).
    """
    w, b = np.broadcast_arrays(np.asarray(weight_var, np.float64), np.asarray(bias_var, np.float64))
    if np.any(w <= 0) or np.any(b < 0):
        raise ValueError(f"need weight_var > 0 and bias_var >= 0, got {weight_var}, {bias_var}")
    if activation not in _ACTIVATIONS:
        _phi(activation, leaky_slope)  # raises the standard ValueError
    shape, w, b = w.shape, w.ravel(), b.ravel()
    q = _q_star_many(activation, w, b, leaky_slope)
    q_eval = np.clip(q, _Q_SMALL, _Q_LARGE)
    # Pad to a power of two (>= 8) by repeating the first point, so that grids of
    # similar sizes reuse one compiled function.
    size = max(8, 1 << (w.size - 1).bit_length())
    pad = lambda a: np.concatenate([a, np.full(size - a.size, a[0])])
    with jax.enable_x64(True):
        c, chi = _correlation_fn(activation, float(leaky_slope))(
            jnp.asarray(pad(w)), jnp.asarray(pad(b)), jnp.asarray(pad(q_eval)))
        c, chi = np.asarray(c, np.float64)[:w.size], np.asarray(chi, np.float64)[:w.size]
    with np.errstate(divide="ignore"):
        # 1e-12: quadrature round-off at criticality, as in depth_scale.
        xi = np.where(chi >= 1 - 1e-12, np.inf,
                      np.where(chi > 0, -1.0 / np.log(np.clip(chi, 1e-300, 1 - 1e-12)), 0.0))
    out = [a.reshape(shape) for a in (q, c, chi, xi)]
    if not shape:
        out = [float(a) for a in out]
    return CorrelationFixedPoint(*out)


def c_star(activation: str, weight_var, bias_var, leaky_slope: float = 0.01):
    """The stable fixed point c* of the correlation map (1 in the ordered phase);
    scalars or arrays, see ``correlation_fixed_point``."""
    return correlation_fixed_point(activation, weight_var, bias_var, leaky_slope).c_star


def chi_c(activation: str, weight_var, bias_var, leaky_slope: float = 0.01):
    """chi_c = weight_var E[phi'(u1) phi'(u2)] at (q*, c*): the slope of the
    correlation map at its fixed point; scalars or arrays."""
    return correlation_fixed_point(activation, weight_var, bias_var, leaky_slope).chi_c


def correlation_depth_scale(activation: str, weight_var, bias_var, leaky_slope: float = 0.01):
    """The *correlation* depth scale xi_c = -1/log(chi_c) of Schoenholz et al. 2017
    (inf at the order-to-chaos transition): over xi_c blocks the correlation of two
    inputs approaches c* by a factor e; networks deeper than ~6 xi_c do not train.
    Not ``depth_scale``, the gradient depth scale 1/|log chi1|, which equals xi_c
    in the ordered phase only. Scalars or arrays (one vectorised computation)."""
    return correlation_fixed_point(activation, weight_var, bias_var, leaky_slope).xi_c


def correlation_map(activation: str, c: float, weight_var: float, bias_var: float,
                    leaky_slope: float = 0.01, *, q: float | None = None) -> float:
    """One step of the correlation map, c -> (weight_var E[phi(u1) phi(u2)] + bias_var) / q',
    u1 = sqrt(q) z1, u2 = sqrt(q) (c z1 + sqrt(1 - c^2) z2), at q = q* unless given,
    q' = length_map(q) (= q* at the fixed point). For c in [-1, 1]."""
    if not -1.0 <= c <= 1.0:
        raise ValueError(f"need a correlation c in [-1, 1], got {c}")
    if q is None:
        q = q_star(activation, weight_var, bias_var, leaky_slope)
    q = min(max(q, _Q_SMALL), _Q_LARGE)
    with jax.enable_x64(True):
        e_phi_phi = float(_bivariate_fn(activation, float(leaky_slope))(
            jnp.asarray(q, jnp.float64), jnp.asarray(c, jnp.float64))[0])
    q_next = length_map(activation, q, weight_var, bias_var, leaky_slope=leaky_slope)
    return (weight_var * e_phi_phi + bias_var) / q_next


def chi_c_at(activation: str, c: float, q: float, weight_var: float,
             leaky_slope: float = 0.01) -> float:
    """weight_var E[phi'(u1) phi'(u2)] at variance q and correlation c: the slope
    of the correlation map at a fixed point q* = q (``chi_c`` is this at (q*, c*))."""
    with jax.enable_x64(True):
        return weight_var * float(_bivariate_fn(activation, float(leaky_slope))(
            jnp.asarray(q, jnp.float64), jnp.asarray(c, jnp.float64))[1])


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


# Positively homogeneous activations (phi(a u) = a phi(u) for a > 0): phi' depends
# only on the sign of u, so chi(q) = weight_var E[phi'(sqrt(q) z)^2] is the same
# for every q > 0 and a prediction needs nothing about the input.
Q_INDEPENDENT = frozenset({"linear", "relu", "leaky_relu", "prelu"})


def residual_alpha_at_init(cfg: ModelConfig) -> float:
    """The branch scale alpha of ``cfg``'s residual blocks at initialisation
    (a number, 1/sqrt(L), or 0 for "learnable_zero")."""
    if cfg.residual_scale == "learnable_zero":
        return 0.0
    if cfg.residual_scale == "inv_sqrt_depth":
        return 1.0 / math.sqrt(cfg.depth)
    return float(cfg.residual_scale)


def _chi(cfg: ModelConfig, weight_var: float, q: float) -> float:
    """weight_var E[phi'(sqrt(q) z)^2]: mean squared singular value of phi -> Dense
    (or Dense -> phi) at pre-activation variance q."""
    return chi1(cfg.activation, weight_var, cfg.bias_var, cfg.leaky_slope, q=q)


def _plain_log_chis(cfg: ModelConfig, weight_var: float, input_second_moment: float | None,
                    at_fixed_point: bool) -> np.ndarray:
    """log chi of each plain block, (L,)."""
    log = lambda c: math.log(c) if c > 0 else -math.inf
    slope, bias_var = cfg.leaky_slope, cfg.bias_var
    if input_second_moment is None:
        # At the fixed point (exact for Q_INDEPENDENT activations, asked for otherwise).
        return np.full(cfg.depth, log(chi1(cfg.activation, weight_var, bias_var, slope)))
    q, log_chis = weight_var * float(input_second_moment) + bias_var, []
    for _ in range(cfg.depth):
        log_chis.append(log(_chi(cfg, weight_var, q)))
        q = length_map(cfg.activation, q, weight_var, bias_var, leaky_slope=slope)
    return np.asarray(log_chis)


def _preact_log_factors(cfg: ModelConfig, weight_var: float, stream_second_moment: float
                        ) -> np.ndarray:
    """log(1 + alpha^2 chi_branch) of each pre-activation block, (L,), propagating the
    stream's per-unit second moment m from h^0: the branch phi -> Dense -> phi -> Dense
    sees variance m at its first activation and q2 = length_map(m) at its second, and
    adds q3 = length_map(q2) to m (its last Dense is zero-mean and independent of h)."""
    alpha2 = residual_alpha_at_init(cfg) ** 2
    act, bias_var, slope = cfg.activation, cfg.bias_var, cfg.leaky_slope
    m, out = float(stream_second_moment), []
    for _ in range(cfg.depth):
        q2 = length_map(act, m, weight_var, bias_var, leaky_slope=slope)
        out.append(math.log1p(alpha2 * _chi(cfg, weight_var, m) * _chi(cfg, weight_var, q2)))
        m += alpha2 * length_map(act, q2, weight_var, bias_var, leaky_slope=slope)
    return np.asarray(out)


def _needs_input(cfg: ModelConfig, what: str) -> ValueError:
    return ValueError(
        f"the mean-field prediction for {what} depends on the input: "
        f"chi(q) of activation={cfg.activation!r} changes with the pre-activation variance q. "
        f"Pass input_second_moment=float(np.mean(h0**2)), the per-unit second moment of the "
        f"stem output h0 = model.hidden_states(variables, x, train=False)[0]"
        + ("" if cfg.residual else
           ", or at_fixed_point=True for the curve at the fixed point q*, which ignores "
           "the approach to q* (flat for critical tanh, whose measured products decay)"))


def predicted_log_product_sq_norms(cfg: ModelConfig, *,
                                   input_second_moment: float | None = None,
                                   at_fixed_point: bool = False) -> np.ndarray:
    """Mean-field prediction of ``JacobianReport.log_product_sq_norms``, shape (L+1,):
    out[l] = log ||P_l||_F^2 / n, P_l = dh^L/dh^l, so out[L] = 0.

    Plain blocks (Dense/Conv -> activation): out[l] = sum_{k=l+1..L} log chi(q_k),
    chi(q) = weight_var E[phi'(sqrt(q) z)^2], with the pre-activation variance
    propagated block by block from the stem output h^0: q_1 = weight_var *
    input_second_moment + bias_var, q_{k+1} = length_map(q_k). This predicts the
    transient while q approaches q* (e.g. the slow 1/k decay of q for tanh at
    weight_var = 1, bias_var = 0, whose products decay polynomially while the
    fixed point q* = 0, chi1 = 1 says flat). Wide limit: at width 128 and depth
    100 finite-width corrections are visible (they shrink like depth / width).

    Pre-activation residual blocks (``residual_form="preact"``): out[l] = sum over
    blocks k > l of log(1 + alpha^2 chi(m_{k-1}) chi(q2_k)), with the stream's
    second moment m_k = m_{k-1} + alpha^2 q3_k propagated from m_0 =
    input_second_moment (see the module docstring); for relu with He init this is
    (1 + alpha^2)^(L - l).

    input_second_moment: mean(h0**2) over units and examples, h0 the stem output
        (``model.hidden_states(variables, x, train=False)[0]``). Required unless
        the activation is in ``Q_INDEPENDENT`` (linear, relu, leaky_relu, prelu),
        for which chi does not depend on q and the prediction does not depend on
        the input; otherwise a ValueError says what to pass, because a prediction
        without it could be silently wrong (e.g. flat for critical tanh).
    at_fixed_point: plain blocks only: explicitly ask for log(chi1) * (L - l) at the
        fixed point q*, the asymptotic slope, ignoring the approach to q*.

    Wide limit, per example (no BatchNorm or LayerNorm: the block map must be block
    diagonal over the batch); conv ignores the zero padding at the sequence ends.
    Other residual forms and normalisation layers have no prediction of this form
    and raise ValueError.
    """
    if cfg.norm != "none":
        raise ValueError(f"no mean-field prediction with normalisation (norm={cfg.norm!r})")
    if cfg.residual and cfg.residual_form != "preact":
        raise ValueError(f"no mean-field prediction for residual_form={cfg.residual_form!r} "
                         f"residual blocks (only for 'preact': its stream stays zero-mean)")
    if input_second_moment is not None and at_fixed_point:
        raise ValueError("pass input_second_moment or at_fixed_point=True, not both")
    if at_fixed_point and cfg.residual:
        raise ValueError("at_fixed_point=True: a residual stream has no fixed point (its "
                         "variance grows block by block); pass input_second_moment")
    if input_second_moment is not None and not (input_second_moment >= 0
                                                and math.isfinite(input_second_moment)):
        raise ValueError(f"invalid input_second_moment={input_second_moment!r}: must be a "
                         f"finite number >= 0")
    q_independent = cfg.activation in Q_INDEPENDENT
    weight_var = effective_weight_var(cfg)
    if cfg.residual:
        if input_second_moment is None and not q_independent:
            raise _needs_input(cfg, "a pre-activation residual network")
        # For Q_INDEPENDENT activations any m_0 > 0 gives the same chis.
        m0 = 1.0 if input_second_moment is None else input_second_moment
        log_factors = _preact_log_factors(cfg, weight_var, m0)
    else:
        if input_second_moment is None and not (q_independent or at_fixed_point):
            raise _needs_input(cfg, "a plain network")
        log_factors = _plain_log_chis(cfg, weight_var, input_second_moment, at_fixed_point)
    with np.errstate(invalid="ignore"):
        # out[l] = sum of the log factors of blocks l+1..L; the last entry (P_L = I) is 0.
        return np.concatenate([np.cumsum(log_factors[::-1])[::-1], [0.0]])
