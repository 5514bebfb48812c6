"""vgrad.analysis.theory against closed forms, independent integration, and a
wide random network."""

from __future__ import annotations

import math
import warnings

import jax
import numpy as np
import pytest
from scipy import integrate

import vgrad.models
from vgrad.analysis import jacobian_products, theory
from vgrad.config import ModelConfig


@pytest.mark.parametrize("weight_var", [0.5, 1.0, 1.7])
def test_linear_closed_forms(weight_var):
    bias_var = 0.0 if weight_var == 1.0 else 0.3  # (1, 0.3): q grows forever, slowly
    assert theory.chi1("linear", weight_var, bias_var) == pytest.approx(weight_var, rel=1e-12)
    if weight_var < 1:  # q = w q + b  =>  q* = b / (1 - w)
        assert theory.q_star("linear", weight_var, 0.3) == pytest.approx(0.3 / (1 - weight_var))
    elif weight_var > 1:
        assert theory.q_star("linear", weight_var, 0.3) == math.inf
    else:  # weight_var = 1, bias 0: every q is a fixed point; q0 = 1 is returned
        assert theory.q_star("linear", 1.0, 0.0) == pytest.approx(1.0)
        assert theory.depth_scale("linear", 1.0, 0.0) == math.inf


@pytest.mark.parametrize("activation,slope", [("relu", 0.0), ("leaky_relu", 0.2),
                                              ("prelu", 0.25)])
def test_rectified_closed_forms(activation, slope):
    # E[phi(sqrt(q) z)^2] = q (1 + a^2) / 2 and E[phi'^2] = (1 + a^2) / 2 for slope a.
    gain = (1 + slope**2) / 2
    for weight_var in (0.8, 1.5, 2.5):
        c = theory.chi1(activation, weight_var, 0.1, leaky_slope=0.2)
        assert c == pytest.approx(weight_var * gain, rel=1e-10)
        q = theory.q_star(activation, weight_var, 0.1, leaky_slope=0.2)
        if weight_var * gain < 1:
            assert q == pytest.approx(0.1 / (1 - weight_var * gain), rel=1e-8)
            # No bias: the variance collapses to 0, chi1 is the q -> 0+ limit.
            assert theory.q_star(activation, weight_var, 0.0, leaky_slope=0.2) == 0.0
            assert theory.chi1(activation, weight_var, 0.0, leaky_slope=0.2) == pytest.approx(
                weight_var * gain, rel=1e-10)
        else:
            assert q == math.inf
    assert theory.depth_scale(activation, 1.0, 0.0, leaky_slope=0.2) == pytest.approx(
        -1 / math.log(gain))


def test_hard_tanh_closed_form_with_kinks():
    # phi = clip(z, -1, 1): E[phi'(sqrt(q) z)^2] = P(|z| < c) = erf(c / sqrt 2), c = 1/sqrt(q);
    # E[phi^2] = q (erf(c/sqrt2) - 2 c pdf(c)) + 1 - erf(c/sqrt2).
    weight_var, bias_var = 1.5, 0.05
    q = theory.q_star("hard_tanh", weight_var, bias_var)
    c = 1 / math.sqrt(q)
    inside = math.erf(c / math.sqrt(2))
    pdf = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    length_map = weight_var * (q * (inside - 2 * c * pdf) + 1 - inside) + bias_var
    assert length_map == pytest.approx(q, rel=1e-9)
    assert theory.chi1("hard_tanh", weight_var, bias_var) == pytest.approx(weight_var * inside,
                                                                          rel=1e-9)


def test_selu_self_normalising_fixed_point():
    # SELU's constants make E[selu(z)^2] = 1 for z ~ N(0, 1): q* = 1 at weight_var 1, no bias.
    assert theory.q_star("selu", 1.0, 0.0) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("activation,fn,dfn", [
    ("tanh", np.tanh, lambda u: 1 / np.cosh(u) ** 2),
    ("sigmoid", lambda u: 0.5 * (1 + np.tanh(u / 2)), lambda u: 0.25 / np.cosh(u / 2) ** 2),
    ("elu", lambda u: np.where(u > 0, u, np.expm1(np.minimum(u, 0))),
     lambda u: np.where(u > 0, 1.0, np.exp(np.minimum(u, 0)))),
])
def test_gaussian_expectations_match_adaptive_integration(activation, fn, dfn):
    for q in (0.3, 2.0):
        pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
        # Adaptive quadrature on [-40, 40] (the rest has mass < 1e-300), split at 0.
        ref = integrate.quad(lambda z: fn(math.sqrt(q) * z) ** 2 * pdf(z), -40, 40,
                             points=[0.0], epsabs=1e-13, limit=200)[0]
        dref = integrate.quad(lambda z: dfn(math.sqrt(q) * z) ** 2 * pdf(z), -40, 40,
                              points=[0.0], epsabs=1e-13, limit=200)[0]
        assert theory.gaussian_mean_sq(activation, q) == pytest.approx(ref, rel=1e-8)
        assert theory.gaussian_mean_sq(activation, q, derivative=True) == pytest.approx(
            dref, rel=1e-8)


def test_marginal_case_warns():
    with pytest.warns(RuntimeWarning, match="did not converge"):
        q = theory.q_star("tanh", 1.0, 0.0, max_iter=200)
    assert 0 < q < 0.05  # decaying like 1/t towards the fixed point 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        theory.q_star("tanh", 1.5, 0.05)
        # Run long enough, the 1/t decay is recognised as the fixed point 0, where
        # tanh's chi1 = weight_var * tanh'(0)^2 = 1 exactly (critical).
        assert theory.q_star("tanh", 1.0, 0.0) == 0.0
        assert theory.chi1("tanh", 1.0, 0.0) == pytest.approx(1.0, abs=1e-9)


def test_predicted_products_and_effective_weight_variance():
    cfg = ModelConfig(depth=5, width=16, activation="relu", init="he_normal")
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(cfg), 0.0, atol=1e-12)
    cfg = ModelConfig(depth=4, width=16, activation="sigmoid", init="normal", init_std=0.1)
    assert theory.effective_weight_var(cfg) == pytest.approx(0.16)
    c = theory.chi1("sigmoid", 0.16, 0.0)
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(cfg),
                               math.log(c) * np.array([4, 3, 2, 1, 0]), rtol=1e-12)
    conv = ModelConfig(arch="conv", width=8, kernel_size=3, init="normal", init_std=0.1)
    assert theory.effective_weight_var(conv) == pytest.approx(0.01 * 24)
    for init, expected in (("lecun_normal", 1.0), ("glorot_uniform", 1.0), ("uniform", 1 / 3),
                           ("he_uniform", 2.0)):
        assert theory.effective_weight_var(ModelConfig(init=init)) == pytest.approx(expected)
    with pytest.raises(ValueError, match="residual"):
        theory.predicted_log_product_sq_norms(ModelConfig(residual=True))
    with pytest.raises(ValueError, match="norm"):
        theory.predicted_log_product_sq_norms(ModelConfig(norm="batch"))


def test_wide_tanh_network_matches_mean_field():
    """A width-1000 tanh network: the variance of the pre-activations converges
    to q*, and the measured mean squared singular value of each block Jacobian
    (and the slope of the measured products) matches chi1."""
    weight_var, bias_var, width, depth = 1.5, 0.05, 1000, 8
    cfg = ModelConfig(depth=depth, width=width, num_classes=3, activation="tanh",
                      init="variance_scaling", weight_var=weight_var, bias_var=bias_var)
    model = vgrad.models.build(cfg)
    x = jax.random.normal(jax.random.key(0), (8, 16))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    q_star = theory.q_star("tanh", weight_var, bias_var)
    chi1 = theory.chi1("tanh", weight_var, bias_var)
    assert 0.9 < chi1 < 1  # an ordered-phase network close to criticality

    hs = np.asarray(model.hidden_states(variables, x, train=False), np.float64)
    # q^l = weight_var * mean(h^{l-1}^2) + bias_var (mean over units and examples; the
    # sampling error of 8000 units is ~2%).
    measured_q = weight_var * np.mean(hs[-2] ** 2) + bias_var
    assert measured_q == pytest.approx(q_star, rel=0.05)

    report = jacobian_products(model, variables, x, train=False, key=jax.random.key(2),
                               num_probes=16)
    # After a few blocks q ~ q*: each block's mean squared singular value is chi1
    # up to finite-width fluctuations of ~1/sqrt(8000 units).
    late = report.layer_sq_norms[3:]
    np.testing.assert_allclose(late, chi1, rtol=0.04)
    np.testing.assert_allclose(np.mean(late), chi1, rtol=0.02)
    slope = (report.log_product_sq_norms[3] - report.log_product_sq_norms[depth]) / (depth - 3)
    assert slope == pytest.approx(math.log(chi1), abs=0.02)


def test_prediction_from_the_measured_input_tracks_the_transient():
    """tanh at weight_var = 1, bias_var = 0 is critical with q* = 0: q decays like
    1/k, so the fixed-point prediction (chi1 = 1, flat) misses the measured decay of
    the products, while the prediction propagated from the stem output's second
    moment follows it, block by block."""
    width, depth = 1000, 12
    cfg = ModelConfig(depth=depth, width=width, num_classes=3, activation="tanh",
                      init="variance_scaling", weight_var=1.0)
    model = vgrad.models.build(cfg)
    x = 2.0 * jax.random.normal(jax.random.key(0), (8, 16))
    variables = jax.jit(model.init)(jax.random.key(1), x)
    hs = np.asarray(model.hidden_states(variables, x, train=False), np.float64)
    report = jacobian_products(model, variables, x, train=False, key=jax.random.key(2),
                               num_probes=16)
    propagated = theory.predicted_log_product_sq_norms(
        cfg, input_second_moment=float(np.mean(hs[0] ** 2)))
    fixed_point = theory.predicted_log_product_sq_norms(cfg)
    measured = report.log_product_sq_norms
    assert measured[0] < -0.3  # a clear decay over 12 blocks
    np.testing.assert_allclose(fixed_point, 0.0, atol=1e-6)  # q* = 0, chi1 = 1: flat
    # Finite-width error of a 1000-unit, 8-example batch: a few percent per block.
    np.testing.assert_allclose(measured, propagated, atol=0.05 + 0.05 * abs(measured[0]))
    # At the fixed point, propagation reproduces the fixed-point prediction.
    ordered = ModelConfig(depth=5, width=4, activation="tanh", init="variance_scaling",
                          weight_var=1.5, bias_var=0.05)
    q = theory.q_star("tanh", 1.5, 0.05)
    m = (q - 0.05) / 1.5  # the second moment of h that maps to q*
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(ordered, input_second_moment=m),
                               theory.predicted_log_product_sq_norms(ordered), rtol=1e-6, atol=1e-9)
