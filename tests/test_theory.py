"""vgrad.analysis.theory against closed forms, independent integration, and a
wide random network."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
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
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(cfg, at_fixed_point=True),
                               math.log(c) * np.array([4, 3, 2, 1, 0]), rtol=1e-12)
    # sigmoid's chi depends on q: without the input (or an explicit at_fixed_point) it refuses.
    with pytest.raises(ValueError, match="input_second_moment="):
        theory.predicted_log_product_sq_norms(cfg)
    conv = ModelConfig(arch="conv", width=8, kernel_size=3, init="normal", init_std=0.1)
    assert theory.effective_weight_var(conv) == pytest.approx(0.01 * 24)
    for init, expected in (("lecun_normal", 1.0), ("glorot_uniform", 1.0), ("uniform", 1 / 3),
                           ("he_uniform", 2.0)):
        assert theory.effective_weight_var(ModelConfig(init=init)) == pytest.approx(expected)
    for form in ("postact", "branch_act"):  # only the pre-activation form has a prediction
        with pytest.raises(ValueError, match=form):
            theory.predicted_log_product_sq_norms(ModelConfig(residual=True, residual_form=form))
    with pytest.raises(ValueError, match="norm"):
        theory.predicted_log_product_sq_norms(ModelConfig(norm="batch"))
    with pytest.raises(ValueError, match="norm"):
        theory.predicted_log_product_sq_norms(ModelConfig(norm="batch", residual=True))


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
    measured = report.log_product_sq_norms
    assert measured[0] < -0.3  # a clear decay over 12 blocks
    # Never silently flat: without the input the call refuses and says what to pass...
    with pytest.raises(ValueError, match="input_second_moment=.*hidden_states"):
        theory.predicted_log_product_sq_norms(cfg)
    # ...and the fixed-point curve (q* = 0, chi1 = 1: flat) comes only when asked for.
    fixed_point = theory.predicted_log_product_sq_norms(cfg, at_fixed_point=True)
    np.testing.assert_allclose(fixed_point, 0.0, atol=1e-6)
    with pytest.raises(ValueError, match="not both"):
        theory.predicted_log_product_sq_norms(cfg, input_second_moment=1.0, at_fixed_point=True)
    # Finite-width error of a 1000-unit, 8-example batch: a few percent per block.
    np.testing.assert_allclose(measured, propagated, atol=0.05 + 0.05 * abs(measured[0]))
    # At the fixed point, propagation reproduces the fixed-point prediction.
    ordered = ModelConfig(depth=5, width=4, activation="tanh", init="variance_scaling",
                          weight_var=1.5, bias_var=0.05)
    q = theory.q_star("tanh", 1.5, 0.05)
    m = (q - 0.05) / 1.5  # the second moment of h that maps to q*
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(ordered, input_second_moment=m),
                               theory.predicted_log_product_sq_norms(ordered, at_fixed_point=True),
                               rtol=1e-6, atol=1e-9)


# ---------------------------------------------------------------- residual (pre-activation) theory

def test_preact_residual_prediction_closed_forms():
    # relu with He init: chi = 2 * 1/2 = 1 per branch layer, so (1 + alpha^2)^(L - l),
    # whatever the input (relu's chi does not depend on q).
    for depth, scale, alpha in ((20, 1.0, 1.0), (100, "inv_sqrt_depth", 0.1), (7, 0.3, 0.3)):
        cfg = ModelConfig(depth=depth, residual=True, residual_scale=scale)
        expected = np.log1p(alpha**2) * np.arange(depth, -1, -1)
        np.testing.assert_allclose(theory.predicted_log_product_sq_norms(cfg), expected, rtol=1e-10)
        np.testing.assert_allclose(theory.predicted_log_product_sq_norms(
            cfg, input_second_moment=17.0), expected, rtol=1e-10)
    # linear, weight_var w: each branch layer has chi = w, factor 1 + alpha^2 w^2.
    cfg = ModelConfig(depth=6, activation="linear", init="variance_scaling", weight_var=1.7,
                      bias_var=0.2, residual=True, residual_scale=0.5)
    np.testing.assert_allclose(theory.predicted_log_product_sq_norms(cfg),
                               np.log1p(0.25 * 1.7**2) * np.arange(6, -1, -1), rtol=1e-10)
    # learnable_zero: alpha = 0 at init, every block is the identity.
    cfg = ModelConfig(depth=4, residual=True, residual_scale="learnable_zero", activation="tanh")
    np.testing.assert_array_equal(theory.predicted_log_product_sq_norms(cfg, input_second_moment=1.0), 0.0)


def test_preact_residual_prediction_matches_independent_integration():
    """tanh's chi depends on q: the stream's second moment m is propagated (m += alpha^2 q3),
    re-implemented here with scipy's adaptive quadrature."""
    weight_var, bias_var, alpha, m0, depth = 1.5, 0.05, 0.5, 0.8, 4
    cfg = ModelConfig(depth=depth, activation="tanh", init="variance_scaling", weight_var=weight_var,
                      bias_var=bias_var, residual=True, residual_scale=alpha)
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    mean = lambda f, q: integrate.quad(lambda z: f(math.sqrt(q) * z) * pdf(z), -40, 40,
                                       epsabs=1e-13, limit=200)[0]
    phi_sq, dphi_sq = (lambda u: math.tanh(u) ** 2), (lambda u: 1 / math.cosh(u) ** 4)
    m, logs = m0, []
    for _ in range(depth):
        q2 = weight_var * mean(phi_sq, m) + bias_var
        chi_branch = weight_var * mean(dphi_sq, m) * weight_var * mean(dphi_sq, q2)
        logs.append(math.log1p(alpha**2 * chi_branch))
        m += alpha**2 * (weight_var * mean(phi_sq, q2) + bias_var)
    expected = np.concatenate([np.cumsum(logs[::-1])[::-1], [0.0]])
    got = theory.predicted_log_product_sq_norms(cfg, input_second_moment=m0)
    np.testing.assert_allclose(got, expected, rtol=1e-8)
    # Without the input it refuses (the answer depends on m0), naming what to pass;
    # a residual stream has no fixed point to fall back on.
    with pytest.raises(ValueError, match="input_second_moment="):
        theory.predicted_log_product_sq_norms(cfg)
    with pytest.raises(ValueError, match="no fixed point"):
        theory.predicted_log_product_sq_norms(cfg, at_fixed_point=True)


# ---------------------------------------------------------------- correlation map

def _rectified_kernel(c, a):
    """For phi(u) = max(u, 0) + a min(u, 0) and unit-variance (u1, u2) with correlation c:
    E[phi(u1) phi(u2)] and E[phi'(u1) phi'(u2)], from the arc-cosine kernel of Cho & Saul
    (2009), k(c) = E[relu(u1) relu(u2)] = (sin t + (pi - t) c) / (2 pi), t = arccos c,
    and phi(u) = relu(u) - a relu(-u)."""
    k = lambda c: (math.sqrt(max(1 - c * c, 0.0)) + (math.pi - math.acos(c)) * c) / (2 * math.pi)
    t = math.acos(c)
    return ((1 + a * a) * k(c) - 2 * a * k(-c),
            (1 + a * a) * (math.pi - t) / (2 * math.pi) + 2 * a * t / (2 * math.pi))


@pytest.mark.parametrize("activation,a", [("relu", 0.0), ("leaky_relu", 0.2), ("prelu", 0.25),
                                          ("linear", 1.0)])
def test_correlation_map_matches_arc_cosine_closed_form(activation, a):
    for q, weight_var, bias_var in ((0.7, 1.5, 0.1), (3.0, 2.0, 0.0)):
        for c in (-0.9, -0.3, 0.0, 0.5, 0.95, 0.999, 1.0):
            e_phi, e_dphi = _rectified_kernel(c, a)  # linear: a = 1 gives c and 1
            q_next = weight_var * q * (1 + a * a) / 2 + bias_var
            assert theory.correlation_map(activation, c, weight_var, bias_var, leaky_slope=0.2,
                                          q=q) == pytest.approx(
                (weight_var * q * e_phi + bias_var) / q_next, rel=1e-9, abs=1e-12)
            assert theory.chi_c_at(activation, c, q, weight_var, leaky_slope=0.2) == pytest.approx(
                weight_var * e_dphi, rel=1e-9)


def test_correlation_map_matches_adaptive_integration_for_tanh():
    q, c, weight_var, bias_var = 1.3, 0.6, 2.0, 0.05
    s = math.sqrt(1 - c * c)
    pdf = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)

    def expect(f):
        inner = lambda z1: integrate.quad(
            lambda z2: f(math.sqrt(q) * z1, math.sqrt(q) * (c * z1 + s * z2)) * pdf(z2), -12, 12,
            epsabs=1e-13)[0]
        return integrate.quad(lambda z1: inner(z1) * pdf(z1), -12, 12, epsabs=1e-12)[0]

    e_phi = expect(lambda u, v: math.tanh(u) * math.tanh(v))
    e_dphi = expect(lambda u, v: 1 / (math.cosh(u) * math.cosh(v)) ** 2)
    q_next = theory.length_map("tanh", q, weight_var, bias_var)
    assert theory.correlation_map("tanh", c, weight_var, bias_var, q=q) == pytest.approx(
        (weight_var * e_phi + bias_var) / q_next, rel=1e-9)
    assert theory.chi_c_at("tanh", c, q, weight_var) == pytest.approx(weight_var * e_dphi, rel=1e-9)


def test_correlation_map_matches_monte_carlo_for_every_activation():
    """One step of the map and its slope at (q, c) for every registered activation
    without a closed-form test above, against 400k Monte Carlo pairs (u1, u2),
    evaluated with the model's functions."""
    from vgrad.config import ACTIVATIONS
    from vgrad.models import activation_fn

    q, c, weight_var, bias_var, slope = 1.5, 0.7, 1.8, 0.1, 0.2
    z1, z2 = np.random.default_rng(0).standard_normal((2, 400_000))
    u1 = jnp.asarray(math.sqrt(q) * z1)
    u2 = jnp.asarray(math.sqrt(q) * (c * z1 + math.sqrt(1 - c * c) * z2))
    for activation in sorted(set(ACTIVATIONS) - {"linear", "relu", "leaky_relu", "prelu", "tanh"}):
        phi = activation_fn(activation, leaky_slope=slope)
        dphi = jax.vmap(jax.grad(phi))
        with jax.enable_x64(True):
            mapped = (weight_var * np.asarray(phi(u1) * phi(u2)) + bias_var) / theory.length_map(
                activation, q, weight_var, bias_var, leaky_slope=slope)
            slopes = weight_var * np.asarray(dphi(u1) * dphi(u2))
        for samples, value in (
                (mapped, theory.correlation_map(activation, c, weight_var, bias_var,
                                                leaky_slope=slope, q=q)),
                (slopes, theory.chi_c_at(activation, c, q, weight_var, leaky_slope=slope))):
            stderr = samples.std() / math.sqrt(samples.size)
            assert abs(samples.mean() - value) < 5 * stderr + 1e-12, activation


def test_correlation_fixed_point_ordered_phase():
    # c* = 1 and chi_c = chi1, so xi_c is the gradient depth scale -1/log chi1 here.
    for activation, weight_var, bias_var in (("tanh", 1.2, 0.05), ("relu", 1.5, 0.1),
                                             ("sigmoid", 3.0, 0.0), ("tanh", 0.8, 0.0)):
        fp = theory.correlation_fixed_point(activation, weight_var, bias_var)
        chi1 = theory.chi1(activation, weight_var, bias_var)
        assert chi1 < 1 and fp.c_star == 1.0
        assert fp.chi_c == pytest.approx(chi1, rel=1e-9)
        assert fp.xi_c == pytest.approx(-1 / math.log(chi1), rel=1e-8)
        assert fp.xi_c == pytest.approx(theory.depth_scale(activation, weight_var, bias_var), rel=1e-8)
    assert theory.correlation_fixed_point("relu", 1.5, 0.1).chi_c == pytest.approx(0.75, rel=1e-10)


def test_correlation_fixed_point_chaotic_phase_against_monte_carlo():
    weight_var, bias_var = 2.5, 0.05
    fp = theory.correlation_fixed_point("tanh", weight_var, bias_var)
    assert theory.chi1("tanh", weight_var, bias_var) > 1  # chaotic
    assert 0 < fp.c_star < 0.9 and 0 < fp.chi_c < 1
    assert fp.xi_c == pytest.approx(-1 / math.log(fp.chi_c))
    assert fp.q_star == pytest.approx(theory.q_star("tanh", weight_var, bias_var), rel=1e-12)
    # c* is a fixed point of the map, and stable (slope chi_c < 1).
    assert theory.correlation_map("tanh", fp.c_star, weight_var, bias_var) == pytest.approx(
        fp.c_star, abs=1e-10)
    assert theory.chi_c_at("tanh", fp.c_star, fp.q_star, weight_var) == pytest.approx(fp.chi_c)
    # Monte Carlo with 2e6 pairs (u1, u2) at (q*, c*): standard errors ~ 5e-4.
    rng = np.random.default_rng(0)
    z1, z2 = rng.standard_normal((2, 2_000_000))
    u1 = math.sqrt(fp.q_star) * z1
    u2 = math.sqrt(fp.q_star) * (fp.c_star * z1 + math.sqrt(1 - fp.c_star**2) * z2)
    mapped = (weight_var * np.tanh(u1) * np.tanh(u2) + bias_var) / fp.q_star
    slopes = weight_var / (np.cosh(u1) * np.cosh(u2)) ** 2
    for samples, expected in ((mapped, fp.c_star), (slopes, fp.chi_c)):
        stderr = samples.std() / math.sqrt(samples.size)
        assert abs(samples.mean() - expected) < 4 * stderr


def test_correlation_depth_scale_on_a_phase_diagram_grid():
    """The trainability study's grid: tanh, bias_var 0.05, 50 weight variances in
    0.5..4, in one vectorised call; xi_c peaks at the order-to-chaos transition."""
    weight_vars = np.linspace(0.5, 4.0, 50)
    fp = theory.correlation_fixed_point("tanh", weight_vars, 0.05)
    xi = theory.correlation_depth_scale("tanh", weight_vars, 0.05)
    assert fp.xi_c.shape == (50,) and np.array_equal(xi, fp.xi_c)
    assert np.isfinite(xi).all() and (xi > 0).all()
    log_chi1 = np.array([math.log(theory.chi1("tanh", w, 0.05)) for w in weight_vars])
    transition = int(np.flatnonzero(log_chi1 > 0)[0])  # first chaotic grid point
    assert int(np.argmax(xi)) in (transition - 1, transition)
    assert (fp.c_star[:transition] == 1).all() and (fp.c_star[transition:] < 1).all()
    np.testing.assert_allclose(np.log(fp.chi_c[:transition]), log_chi1[:transition], rtol=1e-8)
    # Rising towards the transition from both sides.
    assert (np.diff(xi[:transition]) > 0).all() and (np.diff(xi[transition:]) < 0).all()
    for i in (0, 30, 49):  # the vectorised grid agrees with scalar evaluations
        scalar = theory.correlation_fixed_point("tanh", float(weight_vars[i]), 0.05)
        assert scalar.xi_c == pytest.approx(xi[i], rel=1e-10)
        assert scalar.c_star == pytest.approx(fp.c_star[i], abs=1e-12)
    with pytest.raises(ValueError, match="weight_var > 0"):
        theory.correlation_fixed_point("tanh", np.array([1.0, -1.0]), 0.05)


def test_wide_tanh_network_correlations_follow_the_correlation_map():
    """Pairs of inputs through width-1000 tanh networks in the chaotic phase: the
    correlation of their pre-activations at every layer follows the correlation
    map iterated from the first layer's (with q propagated too), and ends near c* < 1."""
    weight_var, bias_var, width, depth, pairs, seeds = 2.5, 0.05, 1000, 20, 8, 10
    cfg = ModelConfig(depth=depth, width=width, num_classes=3, activation="tanh",
                      init="variance_scaling", weight_var=weight_var, bias_var=bias_var)
    model = vgrad.models.build(cfg)
    # Pairs of equal-norm inputs with correlation 0.5 (64 features).
    base, noise = np.asarray(jax.random.normal(jax.random.key(0), (2, pairs, 64)), np.float64)
    noise -= base * np.sum(noise * base, -1, keepdims=True) / np.sum(base * base, -1, keepdims=True)
    noise *= np.linalg.norm(base, axis=-1, keepdims=True) / np.linalg.norm(noise, axis=-1, keepdims=True)
    x = np.concatenate([base, 0.5 * base + math.sqrt(0.75) * noise]).astype(np.float32)
    init, hidden = jax.jit(model.init), jax.jit(lambda v, x: model.hidden_states(v, x, train=False))
    c_measured = []
    for seed in range(seeds):
        hs = np.asarray(hidden(init(jax.random.key(seed), x), x), np.float64)  # (L+1, 2P, n)
        a, b = hs[:, :pairs], hs[:, pairs:]
        # Pre-activations z^{l+1} = W h^l + b: their expected covariance given h^l.
        cov = lambda u, v: weight_var * np.mean(u * v, -1) + bias_var
        c_measured.append(cov(a, b) / np.sqrt(cov(a, a) * cov(b, b)))  # (L+1, P)
    c_measured = np.mean(c_measured, axis=(0, 2))
    # The map needs q: take the first layer's, averaged, and propagate it as well.
    h0 = np.asarray(hidden(init(jax.random.key(0), x), x), np.float64)[0]
    q = float(weight_var * np.mean(h0**2) + bias_var)
    c, predicted = c_measured[0], [c_measured[0]]
    for _ in range(depth):
        c = theory.correlation_map("tanh", c, weight_var, bias_var, q=q)
        q = theory.length_map("tanh", q, weight_var, bias_var)
        predicted.append(c)
    # Finite width: one network's correlation (1000 units) is off by ~0.02, shared
    # by its pairs; the mean over 10 networks by ~0.006.
    np.testing.assert_allclose(c_measured, predicted, atol=0.02)
    fp = theory.correlation_fixed_point("tanh", weight_var, bias_var)
    # xi_c ~ 12 blocks: after 20 blocks c is within ~0.03 of c* (0.45).
    assert abs(c_measured[-1] - fp.c_star) < 0.04


def test_bn_gradient_growth_against_closed_forms_and_monte_carlo():
    assert theory.bn_gradient_growth("relu") == pytest.approx(math.pi / (math.pi - 1), rel=1e-6)
    assert theory.bn_gradient_growth("linear") == pytest.approx(1.0, rel=1e-9)
    z = np.random.default_rng(0).standard_normal(500_000)
    for name, f, df in (("tanh", np.tanh, lambda z: 1 / np.cosh(z) ** 2),
                        ("sigmoid", lambda z: 1 / (1 + np.exp(-z)),
                         lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2)):
        mc = np.mean(df(z) ** 2) / np.var(f(z))
        assert theory.bn_gradient_growth(name) == pytest.approx(mc, rel=1e-2), name
    # Leaky ReLU, slope a: E[phi'^2] = E[phi^2] = (1 + a^2)/2, E[phi] = (1 - a)/sqrt(2 pi).
    a = 0.2
    closed = (1 + a**2) / 2 / ((1 + a**2) / 2 - (1 - a) ** 2 / (2 * math.pi))
    assert theory.bn_gradient_growth("leaky_relu", leaky_slope=a) == pytest.approx(closed, rel=1e-9)
    with pytest.raises(ValueError, match="nope"):
        theory.bn_gradient_growth("nope")
