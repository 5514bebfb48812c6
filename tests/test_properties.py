"""Property-based tests (hypothesis) of invariants the research relies on.

Configs are drawn from small fixed sets and the compiled functions are cached
per config, so examples vary the values (weights, inputs, shifts, seeds)
without recompiling; every test stays within a few seconds.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgrad import ModelConfig
from vgrad.models import build
from vgrad.models.initializers import kernel_init

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


@functools.lru_cache(maxsize=None)
def _model(cfg: ModelConfig):
    model = build(cfg)
    return (model, jax.jit(model.init),
            jax.jit(lambda v, x: model.hidden_states(v, x, train=True)),
            jax.jit(lambda v, x: model.hidden_states(v, x, train=False)))


# ----------------------------------------------------------------------------
# BatchNorm (train mode) ignores per-feature affine shifts of its input
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _bn_apply(width: int):
    bn = nn.BatchNorm(use_running_average=False, epsilon=1e-5)
    init = jax.jit(bn.init)
    apply = jax.jit(lambda v, z: bn.apply(v, z, mutable=["batch_stats"])[0])
    return init, apply


@SETTINGS
@given(seed=seeds, width=st.sampled_from([3, 8]), batch=st.sampled_from([4, 32]),
       log_scale=st.floats(-1.0, 1.0), shift=st.floats(-5.0, 5.0))
def test_batchnorm_output_is_invariant_to_per_feature_affine_input_shift(seed, width, batch,
                                                                         log_scale, shift):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(batch, width)).astype(np.float32)
    # Per feature: a positive scale around exp(log_scale) and a shift around `shift`.
    a = np.exp(log_scale + rng.uniform(-0.5, 0.5, width)).astype(np.float32)
    c = (shift + rng.normal(size=width)).astype(np.float32)
    init, apply = _bn_apply(width)
    variables = init(jax.random.key(0), z)
    variables = {"params": {"scale": jnp.asarray(rng.normal(size=width), jnp.float32),
                            "bias": jnp.asarray(rng.normal(size=width), jnp.float32)},
                 "batch_stats": variables["batch_stats"]}
    out, shifted = apply(variables, z), apply(variables, a * z + c)
    # Exact up to epsilon / a^2 and float32 rounding of the (shifted) batch variance.
    np.testing.assert_allclose(shifted, out, rtol=2e-3, atol=2e-3)


BN_BLOCKS = [ModelConfig(depth=1, width=8, num_classes=2, norm="batch", activation=act)
             for act in ("relu", "tanh")]


@SETTINGS
@given(seed=seeds, cfg=st.sampled_from(BN_BLOCKS), log_scale=st.floats(-1.0, 1.0),
       shift=st.floats(-3.0, 3.0))
def test_block_with_batchnorm_ignores_rescaling_its_dense_layer(seed, cfg, log_scale, shift):
    """Scaling column j of a block's Dense kernel by a_j > 0 and shifting its bias
    leaves the block's train-mode output unchanged: BN removes the affine map."""
    model, init, hidden_train, _ = _model(cfg)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
    variables = init(jax.random.key(seed % 1000), x)
    a = np.exp(log_scale + rng.uniform(-0.5, 0.5, cfg.width)).astype(np.float32)
    c = (shift + rng.normal(size=cfg.width)).astype(np.float32)
    params = jax.tree_util.tree_map(lambda p: p, variables["params"])
    dense = params["blocks"]["block"]["layer_0"]["Dense_0"]
    dense["kernel"] = dense["kernel"] * a
    dense["bias"] = dense["bias"] * a + c
    before = hidden_train(variables, x)
    after = hidden_train({**variables, "params": params}, x)
    np.testing.assert_allclose(after, before, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------
# Initialisation variances
# ----------------------------------------------------------------------------


def _expected_var(cfg: ModelConfig, fan_in: int, fan_out: int) -> float:
    return {
        "normal": cfg.init_std ** 2,
        "uniform": 1.0 / (3 * fan_in),
        "lecun_normal": 1.0 / fan_in,
        "glorot_uniform": 2.0 / (fan_in + fan_out),
        "glorot_normal": 2.0 / (fan_in + fan_out),
        "he_normal": 2.0 / fan_in,
        "he_uniform": 2.0 / fan_in,
        "variance_scaling": cfg.weight_var / fan_in,
    }[cfg.init]


@SETTINGS
@given(seed=seeds, init=st.sampled_from(["normal", "uniform", "lecun_normal", "glorot_uniform",
                                         "glorot_normal", "he_normal", "he_uniform",
                                         "variance_scaling", "orthogonal"]),
       fan_in=st.sampled_from([64, 200]), fan_out=st.sampled_from([64, 150]),
       weight_var=st.floats(0.25, 4.0), init_std=st.floats(0.01, 1.0))
def test_kernel_init_has_the_documented_variance(seed, init, fan_in, fan_out, weight_var, init_std):
    cfg = ModelConfig(init=init, weight_var=weight_var, init_std=init_std)
    w = np.asarray(kernel_init(cfg)(jax.random.key(seed), (fan_in, fan_out), jnp.float32),
                   np.float64)
    if init == "orthogonal":  # orthonormal rows or columns, times sqrt(weight_var)
        gram = w.T @ w if fan_in >= fan_out else w @ w.T
        np.testing.assert_allclose(gram, weight_var * np.eye(len(gram)), atol=1e-4 * weight_var)
        return
    expected = _expected_var(cfg, fan_in, fan_out)
    # 64*64 = 4096 entries: the sample variance is within ~3% (1 sigma) of the truth.
    assert abs(w.var() / expected - 1) < 0.15
    assert abs(w.mean()) < 5 * np.sqrt(expected / w.size)


def test_model_kernels_use_the_configured_init():
    cfg = ModelConfig(depth=4, width=128, init="he_normal")
    model, init, _, _ = _model(cfg)
    variables = init(jax.random.key(0), jnp.zeros((2, 40)))
    stem = np.asarray(variables["params"]["stem"]["Dense_0"]["kernel"])
    blocks = np.asarray(variables["params"]["blocks"]["block"]["layer_0"]["Dense_0"]["kernel"])
    assert stem.shape == (40, 128) and blocks.shape == (4, 128, 128)
    assert abs(stem.var() * 40 / 2 - 1) < 0.15
    for l in range(4):  # every block, independently initialised
        assert abs(blocks[l].var() * 128 / 2 - 1) < 0.1
    assert not np.allclose(blocks[0], blocks[1])


# ----------------------------------------------------------------------------
# A residual block whose branch is zero is the identity
# ----------------------------------------------------------------------------

ZERO_BRANCH = [
    ModelConfig(depth=3, width=8, num_classes=2, residual=True, residual_scale=0.0,
                activation="tanh", norm="batch"),
    ModelConfig(depth=3, width=8, num_classes=2, residual=True, residual_scale="learnable_zero",
                activation="relu"),
    ModelConfig(depth=2, width=8, num_classes=2, residual=True, residual_scale=0.0,
                activation="gelu", norm="layer", init="normal", init_std=3.0),
]


@SETTINGS
@given(seed=seeds, cfg=st.sampled_from(ZERO_BRANCH), train=st.booleans(),
       input_scale=st.floats(0.01, 100.0))
def test_residual_block_with_zero_branch_is_the_identity(seed, cfg, train, input_scale):
    model, init, hidden_train, hidden_eval = _model(cfg)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(input_scale * rng.normal(size=(6, 5)), jnp.float32)
    variables = init(jax.random.key(seed % 1000), x)
    hs = np.asarray((hidden_train if train else hidden_eval)(variables, x))
    for l in range(1, cfg.depth + 1):
        np.testing.assert_array_equal(hs[l], hs[0])  # exactly: h + 0 * F(h) = h


# ----------------------------------------------------------------------------
# Gradient estimators: non-negative, exact where they must be, unbiased
# ----------------------------------------------------------------------------

ANALYSED = [
    ModelConfig(depth=3, width=4, num_classes=3, activation="tanh"),
    ModelConfig(depth=2, width=4, num_classes=3, activation="relu", norm="batch", residual=True),
]


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(seed=seeds, cfg=st.sampled_from(ANALYSED), scale=st.floats(0.1, 10.0))
def test_estimators_are_non_negative_and_consistent(seed, cfg, scale):
    from vgrad.analysis import dense_jacobian, jacobian_products

    model, init, _, _ = _model(cfg)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(scale * rng.normal(size=(2, 5)), jnp.float32)
    variables = init(jax.random.key(seed % 1000), x)
    train = cfg.norm == "batch"
    report = jacobian_products(model, variables, x, train=train, key=jax.random.key(seed),
                               num_probes=256)
    L = cfg.depth
    assert report.log_layer_sq_norms.shape == (L,) and report.log_product_sq_norms.shape == (L + 1,)
    assert not np.isnan(report.log_layer_sq_norms).any()
    assert not np.isnan(report.log_product_sq_norms).any()
    assert (report.layer_sq_norms >= 0).all() and (report.product_sq_norms >= 0).all()
    assert report.log_product_sq_norms[L] == 0.0  # P_L = I, and the probes have unit norm
    assert (report.product_rel_stderr >= 0).all() and (report.layer_rel_stderr >= 0).all()
    # Unbiased: the estimate of ||P_0||^2/n matches the dense Jacobian within its error.
    jac = np.asarray(dense_jacobian(model, variables, x, train=train, start=0), np.float64)
    exact = np.sum(jac ** 2) / jac.shape[0]
    estimate = report.product_sq_norms[0]
    assert abs(estimate - exact) <= 6 * report.product_rel_stderr[0] * estimate + 1e-5 * exact

