"""vgrad.analysis estimators against dense references on tiny networks.

The Jacobian estimator is an average of k i.i.d. terms ||u^T M||^2 with u
uniform on the unit sphere of R^n, whose mean is ||M||_F^2 / n and whose
variance is known in closed form (``probe_sd``), so every tolerance below is a
number of standard deviations of the estimator, not a guess.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vgrad.models
from vgrad.analysis import jacobian_products, jacobian_spectrum, top_singular_values
from vgrad.config import ModelConfig

from analysis_setup import CASES, case, msv, probe_sd, setup

SIGMAS = 5.0  # tolerance in estimator standard deviations (two-sided p ~ 6e-7)




@functools.lru_cache(maxsize=None)
def _dense_jacobians_fn(cfg: ModelConfig, train: bool):
    model = vgrad.models.build(cfg)

    def run(variables, x):
        hs = model.hidden_states(variables, x, train=train)
        jac = lambda l: jax.jacfwd(model.block_fn(variables, l, train=train))(hs[l - 1])
        return jax.lax.map(jac, jnp.arange(1, model.depth + 1))

    return jax.jit(run)


def dense_reference(model, variables, x, train):
    """Dense J_l (l = 1..L) by jax.jacfwd of each block on the whole batch, and
    P_l = J_L ... J_{l+1} (l = 0..L) by explicit float64 matrix products."""
    L = model.depth
    stacked = np.asarray(_dense_jacobians_fn(model.cfg, train)(variables, x), np.float64)
    n = int(np.prod(stacked.shape[1:1 + stacked.ndim // 2]))
    jacs = [stacked[l].reshape(n, n) for l in range(L)]
    prods = [None] * (L + 1)
    prods[L] = np.eye(n)
    for l in range(L, 0, -1):
        prods[l - 1] = prods[l] @ jacs[l - 1]
    return jacs, prods


@functools.lru_cache(maxsize=None)
def reference(name: str):
    """Dense (J_l, P_l) of a named case, computed once per test session."""
    model, variables, x, train = case(name)
    return dense_reference(model, variables, x, train)


@pytest.mark.parametrize("name", list(CASES))
def test_jacobian_products_match_dense_reference(name):
    model, variables, x, train = case(name)
    cfg = model.cfg
    jacs, prods = reference(name)
    k = 4096
    report = jacobian_products(model, variables, x, train=train, key=jax.random.key(7),
                               num_probes=k)
    L = cfg.depth
    assert report.log_product_sq_norms.shape == (L + 1,)
    assert report.log_layer_sq_norms.shape == (L,)
    assert report.log_product_sq_norms[L] == 0.0
    assert report.numel == jacs[0].shape[0]
    for l in range(L):
        exact = msv(prods[l])
        tol = SIGMAS * probe_sd(prods[l], k) + 1e-5 * exact
        assert abs(report.product_sq_norms[l] - exact) <= tol, (l, report.product_sq_norms, exact)
    for l in range(1, L + 1):
        exact = msv(jacs[l - 1])
        tol = SIGMAS * probe_sd(jacs[l - 1], k) + 1e-5 * exact
        assert abs(report.layer_sq_norms[l - 1] - exact) <= tol, (l, report.layer_sq_norms, exact)
    # The reported relative standard errors are estimates of the true ones.
    true_rel = np.array([probe_sd(prods[l], k) / msv(prods[l]) for l in range(L)])
    np.testing.assert_allclose(report.product_rel_stderr[:L], true_rel, rtol=0.25, atol=1e-6)

    # Dense end-to-end spectrum = singular values of the independently formed P_0.
    if name not in ("mlp-tanh", "conv-relu-bn-residual-train"):
        return  # (one compilation fewer; the spectrum code has no BN/eval branches)
    sv = jacobian_spectrum(model, variables, x, train=train)
    np.testing.assert_allclose(sv, np.linalg.svd(prods[0], compute_uv=False),
                               rtol=1e-4, atol=1e-5 * sv[0])


def test_batch_jacobian_is_coupled_only_in_train_mode_batchnorm():
    # Train-mode BatchNorm couples the examples; eval mode is per example, so
    # the batch Jacobian is block diagonal.
    def off_diagonal_blocks(j, width, batch):
        j = j.copy()
        per = j.shape[0] // batch
        for b in range(batch):
            j[b * per:(b + 1) * per, b * per:(b + 1) * per] = 0
        return np.abs(j).max()

    for name, coupled in (("conv-relu-bn-residual-train", True), ("conv-tanh-bn-eval", False)):
        model, _, x, _ = case(name)
        jacs, _ = reference(name)
        assert (off_diagonal_blocks(jacs[0], model.cfg.width, x.shape[0]) > 1e-3) == coupled


def test_estimator_error_shrinks_like_inverse_sqrt_probes():
    model, variables, x, train = case("mlp-tanh")
    _, prods = reference("mlp-tanh")
    exact = msv(prods[0])
    rmse = {}
    for k in (4, 4096):
        errs = [jacobian_products(model, variables, x, train=train, key=jax.random.key(s),
                                  num_probes=k).product_sq_norms[0] - exact for s in range(24)]
        rmse[k] = float(np.sqrt(np.mean(np.square(errs))))
        # Unbiased: the mean error is within 4 standard errors of zero.
        assert abs(np.mean(errs)) <= 4 * probe_sd(prods[0], k) / math.sqrt(24)
        # The spread matches the closed-form standard deviation (24 samples of a
        # skewed estimator: over 100 other seed sets the ratio stayed in [0.6, 1.6]).
        assert 0.4 < rmse[k] / probe_sd(prods[0], k) < 2.0, (k, rmse[k], probe_sd(prods[0], k))
    assert rmse[4096] < rmse[4] / 10  # sqrt(1024) = 32 in expectation


def test_depth_1000_sigmoid_naive_init_stays_finite_and_matches_plain_domain():
    cfg = ModelConfig(depth=1000, width=8, num_classes=3, activation="sigmoid", init="normal",
                      init_std=0.01)
    model, variables, x = setup(cfg, batch=2)
    args = dict(train=True, key=jax.random.key(0), num_probes=4)
    report = jacobian_products(model, variables, x, **args)
    assert np.all(np.isfinite(report.log_product_sq_norms))
    assert np.all(np.isfinite(report.log_layer_sq_norms))
    # Each block shrinks the squared gradient by ~ width * init_std^2 * sigmoid'^2 ~ 5e-5.
    assert np.all(report.log_layer_sq_norms < -5)
    assert report.log_product_sq_norms[0] < -5000
    assert np.all(np.diff(report.log_product_sq_norms) > 0)  # monotone towards the output
    # The plain-domain accumulation (same probes) underflows float32 after a few
    # blocks; where it does not, both domains give the same numbers.
    plain = jacobian_products(model, variables, x, log_domain=False, **args)
    assert plain.log_product_sq_norms[0] == -np.inf
    finite = np.isfinite(plain.log_product_sq_norms)
    assert finite.sum() >= 6
    np.testing.assert_allclose(report.log_product_sq_norms[finite],
                               plain.log_product_sq_norms[finite], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(report.log_layer_sq_norms, plain.log_layer_sq_norms, rtol=1e-6)
    # Top singular value of the full product is tiny but representable in the log domain.
    log_top = top_singular_values(model, variables, x, train=True, key=jax.random.key(1),
                                  k=1, num_iters=2, oversample=0, log=True)
    assert np.isfinite(log_top[0]) and log_top[0] < -2000
    assert log_top[0] >= 0.5 * report.log_product_sq_norms[0]  # s_max^2 >= mean s^2


def test_deep_linear_orthogonal_network_is_an_isometry():
    cfg = ModelConfig(depth=6, width=4, num_classes=3, activation="linear", init="orthogonal",
                      weight_var=1.0, bias_var=0.0)
    model, variables, x = setup(cfg, batch=2)
    sv = jacobian_spectrum(model, variables, x, train=True)
    assert sv.shape == (8,)
    np.testing.assert_allclose(sv, 1.0, atol=1e-5)
    report = jacobian_products(model, variables, x, train=True, key=jax.random.key(0),
                               num_probes=4)
    np.testing.assert_allclose(report.log_product_sq_norms, 0.0, atol=1e-5)
    np.testing.assert_allclose(report.log_layer_sq_norms, 0.0, atol=1e-5)
    np.testing.assert_allclose(top_singular_values(model, variables, x, train=True,
                                                   key=jax.random.key(1), k=2), 1.0, atol=1e-5)


@pytest.mark.parametrize("name", ["mlp-tanh", "conv-relu-bn-residual-train"])
def test_top_singular_values_match_dense_spectrum(name):
    model, variables, x, train = case(name)
    sv = jacobian_spectrum(model, variables, x, train=train)
    top = top_singular_values(model, variables, x, train=train, key=jax.random.key(0), k=3,
                              num_iters=200)
    np.testing.assert_allclose(top, sv[:3], rtol=1e-3)
    if name != "mlp-tanh":
        return
    # A sub-range start..stop agrees with the dense Jacobian of that range (J_2).
    jac = reference(name)[0][1]
    top12 = top_singular_values(model, variables, x, train=train, key=jax.random.key(0), k=1,
                                start=1, stop=2, num_iters=200)
    np.testing.assert_allclose(top12, np.linalg.svd(jac, compute_uv=False)[:1], rtol=1e-3)


def test_spectrum_range_checks():
    model, variables, x, _ = case("mlp-tanh")
    with pytest.raises(ValueError, match="start"):
        jacobian_spectrum(model, variables, x, train=True, start=2, stop=1)
    with pytest.raises(ValueError, match="max_numel"):
        jacobian_spectrum(model, variables, x, train=True, max_numel=4)
    np.testing.assert_allclose(jacobian_spectrum(model, variables, x, train=True, start=2,
                                                 stop=2), 1.0)
