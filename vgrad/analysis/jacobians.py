"""Jacobian products of the block stack, matrix-free and (for small nets) dense.

Notation. Block l (1-based) maps h^{l-1} -> h^l; J_l = dh^l/dh^{l-1} is taken
over the *whole batch map* (B, ...) -> (B, ...), a matrix of size n x n with
n = numel(h) = B * width (* length for conv). With BatchNorm in train mode the
examples are coupled and J_l is not block diagonal; otherwise it is.
P_l = J_L ... J_{l+1} = dh^L/dh^l (P_L = I), so that the backpropagated
gradient is dL/dh^l = dL/dh^L . P_l.

All quantities are reported as *mean squared singular values*,
||M||_F^2 / n, in the natural-log domain, because at depth 1000 the products
under- or overflow any floating-point format.

Estimator (``jacobian_products``). Probes u_i are drawn uniformly on the unit
sphere of R^n (a normalised Gaussian). For any matrix M,
E ||u^T M||^2 = ||M||_F^2 / n, so  mean_i ||u_i^T M||^2  is an unbiased
estimate of the mean squared singular value. Compared with unnormalised
Gaussian probes (E ||v^T M||^2 = ||M||_F^2) the spherical probes have a smaller
variance, Var = 2 n / (n + 2) * (||A||_F^2 - tr(A)^2 / n) / n^2 with A = M M^T,
and give exactly ||P_L||^2 / n = 1. The row vectors u_i^T P_l for *every* l
come out of one backward pass: u^T P_{l-1} = (u^T P_l) J_l is one VJP of
block l. Each probe is renormalised to unit length after every block and the
log of the factor is accumulated per probe (s_i), so the estimate
log(mean_i exp(2 s_i)) is formed with logsumexp and never underflows; this is
the same unbiased estimator, only computed in another floating-point domain.

Models. Everything here uses only the analysis protocol documented in
``vgrad.models.AnalysisModel`` (``depth``, ``hidden_states``, ``block_fn``), so
vgrad's own models, ``vgrad.models.layered(...)`` models and the linen / NNX
adapters are analysed by the same code. Jitted functions are cached per model
key (``_cache_key``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vgrad.config import ModelConfig, without_init
from vgrad.io import to_jsonable
from vgrad.models.layered import check_protocol
from vgrad.models.model import LayeredModel

# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _unit_probes(key: jax.Array, num: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """``num`` independent probes uniform on the unit sphere, shape (num, *shape).

    ``dtype`` is the hidden states' dtype, so float64 analysis (jax_enable_x64)
    runs in float64 throughout."""
    g = jax.random.normal(key, (num, *shape), dtype)
    norms = jnp.sqrt(jnp.sum(g.reshape(num, -1) ** 2, axis=1))
    return g / norms.reshape((num,) + (1,) * len(shape))


def _fast_key(key: jax.Array) -> jax.Array:
    """An "rbg" PRNG key derived from any key (typed or raw uint32).

    Probes are drawn with XLA's RngBitGenerator ("rbg" impl) instead of the
    default threefry: it is statistically as good for this purpose and compiles
    in a fraction of the time on CPU (about 0.2 s instead of 1.5 s per call site).
    Draws are deterministic given the key on one backend, but may differ across
    backends (CPU/GPU).
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        data = jax.random.key_data(key)
    else:
        data = jnp.asarray(key, jnp.uint32)
    data = data.reshape(-1).astype(jnp.uint32)
    if data.shape[0] == 2:  # threefry: widen to the 4 words of an rbg key
        data = jnp.concatenate([data, data ^ jnp.uint32(0x9E3779B9)])
    elif data.shape[0] != 4:
        raise ValueError(f"unsupported PRNG key with data shape {data.shape}")
    return jax.random.wrap_key_data(data, impl="rbg")


def _log_norms_and_directions(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Row-wise log 2-norms (k,) of w (k, ...) and w / ||w|| (zero rows stay zero, log = -inf).

    The norm is taken after dividing by the largest |entry|, so that tiny vectors
    (1e-30 entries, whose squares underflow float32) still get an accurate norm.
    """
    k = w.shape[0]
    flat = w.reshape(k, -1)
    peak = jnp.max(jnp.abs(flat), axis=1)
    safe_peak = jnp.where(peak > 0, peak, 1.0)
    scaled = flat / safe_peak[:, None]
    rel = jnp.sqrt(jnp.sum(scaled**2, axis=1))  # in [1, sqrt(n)] for nonzero rows
    log_norm = jnp.where(peak > 0, jnp.log(safe_peak) + jnp.log(jnp.where(peak > 0, rel, 1.0)),
                         -jnp.inf)
    direction = jnp.where((peak > 0)[:, None], scaled / jnp.where(peak > 0, rel, 1.0)[:, None], 0.0)
    return log_norm, direction.reshape(w.shape)


def _log_mean_exp(a: jax.Array) -> jax.Array:
    """log(mean(exp(a))) over the last axis, stable; -inf when every entry is -inf."""
    return jax.nn.logsumexp(a, axis=-1) - math.log(a.shape[-1])


def _rel_stderr(log_values: jax.Array) -> jax.Array:
    """Relative standard error of the mean of exp(log_values) over the last axis
    (sample std / (mean * sqrt(k))); NaN for k = 1 or when every value is 0."""
    k = log_values.shape[-1]
    if k < 2:
        return jnp.full(log_values.shape[:-1], jnp.nan)
    top = jnp.max(log_values, axis=-1, keepdims=True)
    vals = jnp.exp(log_values - jnp.where(jnp.isfinite(top), top, 0.0))
    mean = jnp.mean(vals, axis=-1)
    std = jnp.std(vals, axis=-1, ddof=1)
    return std / (mean * math.sqrt(k))


# Config fields that only choose the initial values of the variables: the
# functions of (variables, x) compiled here do not depend on them, so sweeping
# initialisations reuses one compilation.


class _IdentityKey:
    """Cache key of a model without a ``cache_key``: the object itself.

    Hashes by ``id`` but holds only a weak reference and compares equal only
    while both keys refer to the same live object, so a new model that reuses
    the ``id`` of a collected one never hits the old model's compiled
    functions. Objects that cannot be weakly referenced are held strongly.
    """

    __slots__ = ("_ref", "_hash", "__weakref__")

    def __init__(self, obj: Any):
        try:
            self._ref = weakref.ref(obj)
        except TypeError:
            self._ref = lambda obj=obj: obj
        self._hash = id(obj)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _IdentityKey):
            return NotImplemented
        mine = self._ref()
        return mine is not None and mine is other._ref()

    def __repr__(self) -> str:
        return f"_IdentityKey({self._ref()!r})"


def _cache_key(model: Any) -> Any:
    """The key that jit caches use for ``model``: models with equal keys compute
    the same functions of (variables, x).

    vgrad's own models: their config (up to the init-only fields). Other
    models: ``(type, model.cache_key)`` when they define a hashable
    ``cache_key``, else the object itself (``_IdentityKey``)."""
    if isinstance(model, LayeredModel):
        cfg = model.cfg
        if isinstance(cfg, ModelConfig):
            cfg = without_init(cfg)
        return (type(model), cfg)
    key = getattr(model, "cache_key", None)
    if key is None:
        return _IdentityKey(model)
    try:
        hash(key)
    except TypeError:
        raise TypeError(f"{type(model).__name__}.cache_key must be hashable, got "
                        f"{type(key).__name__}") from None
    return (type(model), key)


# key -> the first live model seen with that key, whose functions the cached
# closures call. Weak values: an entry goes when its model is collected (the
# cached closures hold their model while they are cached). Models that cannot
# be weakly referenced are kept in _STRONG_MODELS.
_MODELS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_STRONG_MODELS: dict[Any, Any] = {}


def _canonical_model(model: Any) -> Any:
    """The first live model seen with this model's key (so jitted closures can be reused)."""
    check_protocol(model)
    key = _cache_key(model)
    try:
        return _MODELS.setdefault(key, model)
    except TypeError:
        return _STRONG_MODELS.setdefault(key, model)


def _model_for(key: Any) -> Any:
    """The model registered for ``key`` by ``_canonical_model``."""
    model = _MODELS.get(key)
    return _STRONG_MODELS[key] if model is None else model


def _check_range(model: Any, start: int, stop: int | None) -> tuple[int, int]:
    check_protocol(model)
    L = model.depth
    stop = L if stop is None else int(stop)
    start = int(start)
    if not 0 <= start <= stop <= L:
        raise ValueError(f"need 0 <= start <= stop <= depth={L}, got start={start}, stop={stop}")
    return start, stop


# --------------------------------------------------------------------------
# jacobian_products
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class JacobianReport:
    """Per-layer Jacobian statistics of the block stack (natural logs).

    log_layer_sq_norms: (L,), index l-1 for block l: log(||J_l||_F^2 / n), the log
        mean squared singular value of block l's Jacobian.
    log_product_sq_norms: (L+1,), index l = 0..L: log(||P_l||_F^2 / n),
        P_l = J_L ... J_{l+1} = dh^L/dh^l; the last entry is exactly 0.
    layer_rel_stderr / product_rel_stderr: (L,) / (L+1,) sample relative standard
        error of the (non-log) estimates; the log estimate's standard error is
        about the same number for small values. NaN with one probe; 0 at l = L.
    num_probes: probes per estimate; numel: n = numel(h) of the batch map;
    train: whether BatchNorm used batch statistics.
    """

    log_layer_sq_norms: np.ndarray
    log_product_sq_norms: np.ndarray
    layer_rel_stderr: np.ndarray
    product_rel_stderr: np.ndarray
    num_probes: int
    numel: int
    train: bool

    @property
    def depth(self) -> int:
        return int(self.log_layer_sq_norms.shape[0])

    @property
    def layer_sq_norms(self) -> np.ndarray:
        """||J_l||_F^2 / n, (L,); may under/overflow for deep nets (use the logs)."""
        return np.exp(self.log_layer_sq_norms)

    @property
    def product_sq_norms(self) -> np.ndarray:
        """||P_l||_F^2 / n, (L+1,); may under/overflow for deep nets (use the logs)."""
        return np.exp(self.log_product_sq_norms)

    def to_dict(self) -> dict:
        return to_jsonable(self)


@functools.lru_cache(maxsize=64)
def _products_fn(key: Any, train: bool, num_probes: int, log_domain: bool):
    model = _model_for(key)
    L = model.depth
    k = num_probes

    def run(variables, x, rng):
        hs = model.hidden_states(variables, x, train=train)  # (L+1, *h)
        hshape = hs.shape[1:]
        prod_key, layer_key = jax.random.split(_fast_key(rng))
        u0 = _unit_probes(prod_key, k, hshape, hs.dtype)

        def step(carry, l):
            u, log_scale = carry  # probe i is exp(log_scale_i) * u_i = u_i^T P_l (unit start)
            f = model.block_fn(variables, l, train=train)
            _, vjp = jax.vjp(f, hs[l - 1])
            fresh = _unit_probes(jax.random.fold_in(layer_key, l), k, hshape, hs.dtype)
            w = jax.vmap(lambda c: vjp(c)[0])(jnp.concatenate([u, fresh], axis=0))
            log_norms, directions = _log_norms_and_directions(w)
            log_layer = 2.0 * log_norms[k:]
            if log_domain:
                u_new, log_scale_new = directions[:k], log_scale + log_norms[:k]
                log_prod = 2.0 * log_scale_new
            else:  # plain accumulation, for validation only: underflows in deep nets
                u_new, log_scale_new = w[:k], log_scale
                log_prod = jnp.log(jnp.sum(w[:k].reshape(k, -1) ** 2, axis=1))
            out = (_log_mean_exp(log_prod), _rel_stderr(log_prod),
                   _log_mean_exp(log_layer), _rel_stderr(log_layer))
            return (u_new, log_scale_new), out

        ls = jnp.arange(L, 0, -1)
        _, (lp, lp_err, ll, ll_err) = jax.lax.scan(step, (u0, jnp.zeros((k,))), ls)
        # Step for block l produced P_{l-1} and J_l; reverse to index by l.
        zero = jnp.zeros((1,))
        log_products = jnp.concatenate([lp[::-1], zero])
        product_err = jnp.concatenate([lp_err[::-1], zero])
        return log_products, product_err, ll[::-1], ll_err[::-1], hs[0].size

    return jax.jit(run)


def jacobian_products(model: Any, variables: dict, x: jax.Array, *, train: bool,
                      key: jax.Array, num_probes: int = 8, log_domain: bool = True
                      ) -> JacobianReport:
    """Mean squared singular values of every block Jacobian J_l and every product P_l.

    Args:
      model: any model of the analysis protocol (``depth``, ``hidden_states``,
        ``block_fn``; see ``vgrad.models.AnalysisModel``): ``vgrad.models.build(cfg)``,
        ``vgrad.models.layered(...)``, ``from_linen``, ``from_nnx``.
      variables: ``{"params", "batch_stats"}`` of the model.
      x: input batch (B, ...). Jacobians are of the whole-batch map, n = numel(h).
      train: BatchNorm uses batch statistics (True) or running averages (False).
      key: PRNG key for the probes.
      num_probes: k probes for the products (one backward VJP pass through all
        blocks, vmapped over probes) plus k fresh probes per block for J_l. Cost
        is about 2k VJPs per block; the relative standard error of each estimate
        is at most sqrt(2/k) and often much smaller (see ``*_rel_stderr``).
      log_domain: renormalise the probes after every block and accumulate the
        log scale (default). False accumulates the raw products (same estimator;
        validation only, it underflows to -inf in deep vanishing networks).

    Jitted; the compiled function is cached per (model key, train, num_probes):
    the config for vgrad's models, ``model.cache_key`` or the object otherwise.
    """
    if int(num_probes) < 1:
        raise ValueError(f"invalid num_probes={num_probes!r}: must be an integer >= 1")
    fn = _products_fn(_cache_key(_canonical_model(model)), bool(train), int(num_probes),
                      bool(log_domain))
    lp, lp_err, ll, ll_err, n = fn(variables, jnp.asarray(x), key)
    return JacobianReport(
        log_layer_sq_norms=np.asarray(ll, np.float64),
        log_product_sq_norms=np.asarray(lp, np.float64),
        layer_rel_stderr=np.asarray(ll_err, np.float64),
        product_rel_stderr=np.asarray(lp_err, np.float64),
        num_probes=int(num_probes), numel=int(n), train=bool(train))


# --------------------------------------------------------------------------
# exact / iterative spectra of the end-to-end Jacobian dh^stop / dh^start
# --------------------------------------------------------------------------


def chain_fn(model: Any, variables: dict, start: int, stop: int, *, train: bool):
    """The pure map h^start -> h^stop (blocks start+1 .. stop) over a whole batch."""

    def chain(h):
        return jax.lax.fori_loop(
            start + 1, stop + 1, lambda l, h: model.block_fn(variables, l, train=train)(h), h)

    return chain


@functools.lru_cache(maxsize=64)
def _dense_jacobian_fn(key: Any, train: bool, start: int, stop: int):
    model = _model_for(key)

    def run(variables, x):
        hs = model.hidden_states(variables, x, train=train)
        h = hs[start]
        jac = jax.jacfwd(chain_fn(model, variables, start, stop, train=train))(h)
        return jac.reshape(h.size, h.size)

    return jax.jit(run)


def dense_jacobian(model: Any, variables: dict, x: jax.Array, *, train: bool,
                   start: int = 0, stop: int | None = None) -> jax.Array:
    """The dense (n, n) Jacobian dh^stop/dh^start of the whole-batch map (rows: outputs)."""
    start, stop = _check_range(model, start, stop)
    fn = _dense_jacobian_fn(_cache_key(_canonical_model(model)), bool(train), start, stop)
    return fn(variables, jnp.asarray(x))


def jacobian_spectrum(model: Any, variables: dict, x: jax.Array, *, train: bool,
                      start: int = 0, stop: int | None = None, max_numel: int = 8192
                      ) -> np.ndarray:
    """All n singular values (descending, float64) of dh^stop/dh^start, stop defaults to L.

    Dense: forms the (n, n) Jacobian with ``jax.jacfwd`` (n JVPs) and takes an
    SVD, so it is for small nets and validation; n = numel(h) above ``max_numel``
    raises ValueError (use ``top_singular_values``). Singular values below
    float32 resolution of the largest are not meaningful.
    """
    n = _hidden_numel(model, variables, x, train)
    if n > max_numel:
        raise ValueError(f"jacobian_spectrum would form a dense {n}x{n} Jacobian "
                         f"(numel(h)={n} > max_numel={max_numel}); use top_singular_values")
    jac = dense_jacobian(model, variables, x, train=train, start=start, stop=stop)
    return np.linalg.svd(np.asarray(jac, np.float64), compute_uv=False)


def _hidden_numel(model: Any, variables: dict, x: Any, train: bool) -> int:
    """n = numel(h) of one hidden state of the batch, from the protocol alone
    (shapes only: ``jax.eval_shape`` of ``hidden_states``, nothing is computed)."""
    check_protocol(model)
    hs = jax.eval_shape(lambda v, x: model.hidden_states(v, x, train=train), variables,
                        jnp.asarray(x))
    return int(np.prod(hs.shape[1:]))


@functools.lru_cache(maxsize=64)
def _top_sv_fn(key: Any, train: bool, start: int, stop: int, p: int, k: int, num_iters: int):
    model = _model_for(key)
    fwd_ls = jnp.arange(start + 1, stop + 1)
    bwd_ls = jnp.arange(stop, start, -1)

    def joint_normalise(w):
        log_norm, _ = _log_norms_and_directions(w.reshape(1, -1))
        log_norm = log_norm[0]
        scale = jnp.where(jnp.isfinite(log_norm), jnp.exp(-log_norm), 0.0)
        return w * scale, log_norm

    def run(variables, x, rng):
        hs = model.hidden_states(variables, x, train=train)
        hshape = hs.shape[1:]
        n = hs[0].size

        # V (p, *h) -> J V with one common scale per block (so it never underflows);
        # returns the renormalised block and the accumulated log scale.
        def jvp_chain(V):
            def step(carry, l):
                V, c = carry
                f = model.block_fn(variables, l, train=train)
                W = jax.vmap(lambda v: jax.jvp(f, (hs[l - 1],), (v,))[1])(V)
                W, log_norm = joint_normalise(W)
                return (W, c + log_norm), None
            (V, c), _ = jax.lax.scan(step, (V, jnp.zeros(())), fwd_ls)
            return V, c

        def vjp_chain(V):
            def step(carry, l):
                V, c = carry
                _, vjp = jax.vjp(model.block_fn(variables, l, train=train), hs[l - 1])
                W = jax.vmap(lambda v: vjp(v)[0])(V)
                W, log_norm = joint_normalise(W)
                return (W, c + log_norm), None
            (V, c), _ = jax.lax.scan(step, (V, jnp.zeros(())), bwd_ls)
            return V, c

        def orthonormalise(V):
            q, _ = jnp.linalg.qr(V.reshape(p, n).T)
            return q.T.reshape(V.shape)

        Q = orthonormalise(jax.random.normal(_fast_key(rng), (p, *hshape)))

        def body(_, Q):
            W, _ = jvp_chain(Q)
            Z, _ = vjp_chain(W)
            return orthonormalise(Z)

        Q = jax.lax.fori_loop(0, num_iters, body, Q)
        # Rayleigh-Ritz: the singular values of J Q (Q orthonormal, spanning the
        # dominant right singular subspace) approximate the top ones from below.
        W, c = jvp_chain(Q)
        sv = jnp.linalg.svd(W.reshape(p, n), compute_uv=False)[:k]
        return jnp.where(sv > 0, jnp.log(jnp.where(sv > 0, sv, 1.0)) + c, -jnp.inf)

    return jax.jit(run)


def top_singular_values(model: Any, variables: dict, x: jax.Array, *, train: bool,
                        key: jax.Array, start: int = 0, stop: int | None = None, k: int = 1,
                        num_iters: int = 30, oversample: int = 5, log: bool = False
                        ) -> np.ndarray:
    """Top-k singular values (descending) of dh^stop/dh^start, using only JVPs and VJPs.

    Randomised subspace iteration on J^T J with p = k + oversample vectors (each
    iteration: p JVPs forward through blocks start+1..stop, p VJPs back, a QR),
    then Rayleigh-Ritz on J Q. The block of vectors is renormalised after every
    block with one common factor whose log is accumulated, so the answer is
    finite even when the singular values under/overflow float32; pass
    ``log=True`` to get natural-log singular values (needed when they also
    under/overflow float64). Convergence of value i is geometric with ratio
    (s_{p+1}/s_i)^2 per iteration; raise ``num_iters`` for clustered spectra.
    """
    start, stop = _check_range(model, start, stop)
    n = _hidden_numel(model, variables, x, train)
    if not 1 <= int(k) <= n:
        raise ValueError(f"invalid k={k!r}: must be in [1, numel(h)={n}]")
    p = min(int(k) + max(int(oversample), 0), n)
    fn = _top_sv_fn(_cache_key(_canonical_model(model)), bool(train), start, stop, p, int(k),
                    int(num_iters))
    log_sv = np.asarray(fn(variables, jnp.asarray(x), key), np.float64)
    return log_sv if log else np.exp(log_sv)
