"""Models: activations, initialisers, BatchNorm, and the scanned stack against a loop reference."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import ModelConfig
from vgrad.config import ACTIVATIONS
from vgrad.models import activation_fn, build
from references import conv_same, dense

KEY = jax.random.key(0)


def _phi(x):  # standard normal pdf / cdf, written out independently of jax
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def _Phi(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


SELU_L, SELU_A = 1.0507009873554805, 1.6732632423543772
SIG1 = 1 / (1 + math.exp(-1))
# (activation, x, f(x), f'(x)) from closed forms.
KNOWN = [
    ("linear", -1.5, -1.5, 1.0),
    ("sigmoid", 0.0, 0.5, 0.25),
    ("sigmoid", 1.0, SIG1, SIG1 * (1 - SIG1)),
    ("tanh", 0.0, 0.0, 1.0),
    ("tanh", 1.0, math.tanh(1), 1 - math.tanh(1) ** 2),
    ("hard_tanh", 0.5, 0.5, 1.0),
    ("hard_tanh", 2.0, 1.0, 0.0),
    ("hard_tanh", -3.0, -1.0, 0.0),
    ("softsign", 1.0, 0.5, 0.25),
    ("softsign", -3.0, -0.75, 1 / 16),
    ("relu", -1.0, 0.0, 0.0),
    ("relu", 2.0, 2.0, 1.0),
    ("leaky_relu", -2.0, -0.02, 0.01),
    ("leaky_relu", 3.0, 3.0, 1.0),
    ("prelu", -2.0, -0.5, 0.25),
    ("prelu", 2.0, 2.0, 1.0),
    ("elu", -1.0, math.exp(-1) - 1, math.exp(-1)),
    ("elu", 1.0, 1.0, 1.0),
    ("selu", 1.0, SELU_L, SELU_L),
    ("selu", -1.0, SELU_L * SELU_A * (math.exp(-1) - 1), SELU_L * SELU_A * math.exp(-1)),
    ("gelu", 1.0, _Phi(1.0), _Phi(1.0) + _phi(1.0)),
    ("gelu", -0.5, -0.5 * _Phi(-0.5), _Phi(-0.5) - 0.5 * _phi(-0.5)),
    ("silu", 1.0, SIG1, SIG1 + SIG1 * (1 - SIG1)),
]


def test_known_values_cover_every_activation():
    assert {name for name, *_ in KNOWN} == set(ACTIVATIONS)


@pytest.mark.parametrize("name, x, value, slope", KNOWN, ids=[f"{k[0]}({k[1]})" for k in KNOWN])
def test_activation_value_and_derivative(name, x, value, slope):
    f = activation_fn(name, leaky_slope=0.01)
    np.testing.assert_allclose(f(jnp.float32(x)), value, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.grad(f)(jnp.float32(x)), slope, rtol=1e-5, atol=1e-7)


def test_prelu_slope_is_a_parameter_that_learns():
    from vgrad import TrainConfig
    from vgrad.train import create_state, make_train_step

    model = build(ModelConfig(depth=2, width=8, activation="prelu", num_classes=3))
    x = jax.random.normal(KEY, (32, 5))
    y = jnp.arange(32) % 3
    state = create_state(model, TrainConfig(learning_rate=0.1), KEY, x)
    slope0 = state.params["blocks"]["block"]["layer_0"]["prelu_slope"]
    np.testing.assert_array_equal(slope0, 0.25 * np.ones((2, 8)))
    slope0 = np.asarray(slope0)  # the step donates the state
    step = make_train_step(model, TrainConfig(learning_rate=0.1))
    for _ in range(5):
        state, _ = step(state, {"x": x, "y": y})
    slope = np.asarray(state.params["blocks"]["block"]["layer_0"]["prelu_slope"])
    assert np.abs(slope - slope0).max() > 1e-4


# ---------------------------------------------------------------- initialisers

def _first_block_kernel(cfg, in_shape):
    variables = build(cfg).init(KEY, jnp.zeros(in_shape))
    layer = variables["params"]["blocks"]["block"]["layer_0"]
    return np.asarray(layer["Conv_0" if cfg.arch == "conv" else "Dense_0"]["kernel"][0]), layer


N = 512  # 512x512 kernel: relative std of the variance estimate ~ 0.3%


@pytest.mark.parametrize("init, fan_in_times_var", [
    ("he_normal", 2.0), ("he_uniform", 2.0), ("lecun_normal", 1.0),
    ("glorot_normal", 1.0), ("glorot_uniform", 1.0), ("xavier", 1.0), ("kaiming", 2.0),
    ("uniform", 1 / 3), ("variance_scaling", 1.7),
])
def test_init_variance_matches_formula(init, fan_in_times_var):
    kernel, _ = _first_block_kernel(ModelConfig(width=N, depth=1, init=init, weight_var=1.7), (2, 4))
    assert kernel.shape == (N, N)
    np.testing.assert_allclose(N * kernel.var(), fan_in_times_var, rtol=0.02)
    assert abs(kernel.mean()) < 0.01 * math.sqrt(fan_in_times_var / N) * N ** 0.5


def test_normal_init_ignores_fan_in():
    kernel, _ = _first_block_kernel(ModelConfig(width=N, depth=1, init="normal", init_std=0.05), (2, 4))
    np.testing.assert_allclose(kernel.std(), 0.05, rtol=0.02)


def test_uniform_init_bounds():
    kernel, _ = _first_block_kernel(ModelConfig(width=N, depth=1, init="uniform"), (2, 4))
    assert np.abs(kernel).max() <= 1 / math.sqrt(N)
    assert np.abs(kernel).max() > 0.99 / math.sqrt(N)


def test_orthogonal_init_has_scaled_orthonormal_columns():
    kernel, _ = _first_block_kernel(ModelConfig(width=64, depth=1, init="orthogonal", weight_var=2.0), (2, 4))
    np.testing.assert_allclose(kernel.T @ kernel, 2.0 * np.eye(64), atol=1e-5)


def test_conv_init_fan_in_includes_kernel_size():
    cfg = ModelConfig(arch="conv", width=128, depth=1, kernel_size=5, init="he_normal")
    kernel, _ = _first_block_kernel(cfg, (2, 16))
    assert kernel.shape == (5, 128, 128)
    np.testing.assert_allclose(5 * 128 * kernel.var(), 2.0, rtol=0.02)


def test_bias_init():
    _, layer = _first_block_kernel(ModelConfig(width=N, depth=1), (2, 4))
    np.testing.assert_array_equal(layer["Dense_0"]["bias"], 0)
    _, layer = _first_block_kernel(ModelConfig(width=N, depth=3, bias_var=0.3), (2, 4))
    np.testing.assert_allclose(np.var(layer["Dense_0"]["bias"]), 0.3, rtol=0.1)


def test_blocks_are_initialised_independently():
    variables = build(ModelConfig(depth=3, width=16)).init(KEY, jnp.zeros((2, 4)))
    kernels = np.asarray(variables["params"]["blocks"]["block"]["layer_0"]["Dense_0"]["kernel"])
    assert not np.allclose(kernels[0], kernels[1])


# ---------------------------------------------------------------- BatchNorm

def _bn_model(**kw):
    cfg = ModelConfig(depth=2, width=6, norm="batch", activation="linear", num_classes=3, **kw)
    model = build(cfg)
    x = 3.0 + 2.0 * jax.random.normal(KEY, (16, 5))
    return cfg, model, model.init(KEY, x), x


def _dense_out(variables, l, h):
    dense = variables["params"]["blocks"]["block"]["layer_0"]["Dense_0"]
    return h @ dense["kernel"][l - 1] + dense["bias"][l - 1]


def test_batchnorm_train_output_is_standardised():
    cfg, model, variables, x = _bn_model()
    hs = model.hidden_states(variables, x, train=True)
    z = _dense_out(variables, 1, hs[0])
    expected_var = z.var(0) / (z.var(0) + cfg.bn_epsilon)  # gamma=1, beta=0 at init
    np.testing.assert_allclose(hs[1].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(hs[1].var(0), expected_var, rtol=1e-4)


def test_batchnorm_running_averages_follow_momentum_and_eval_uses_them():
    cfg, model, variables, x = _bn_model(bn_momentum=0.8)
    before = jax.tree_util.tree_map(np.array, variables)
    _, stats = model.apply(variables, x, train=True)
    # apply is pure: the input variables are untouched.
    chex.assert_trees_all_equal(before, variables)
    hs = model.hidden_states(variables, x, train=True)
    for l in (1, 2):
        z = _dense_out(variables, l, hs[l - 1])
        bn = stats["blocks"]["block"]["layer_0"]["BatchNorm_0"]
        np.testing.assert_allclose(bn["mean"][l - 1], 0.2 * z.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bn["var"][l - 1], 0.8 * 1.0 + 0.2 * z.var(0), rtol=1e-5)
    # Eval mode normalises with the running averages, not the batch.
    new_vars = {"params": variables["params"], "batch_stats": stats}
    h_eval = model.hidden_states(new_vars, x, train=False)
    bn = stats["blocks"]["block"]["layer_0"]["BatchNorm_0"]
    z = _dense_out(new_vars, 1, h_eval[0])
    expected = (z - bn["mean"][0]) / jnp.sqrt(bn["var"][0] + cfg.bn_epsilon)
    np.testing.assert_allclose(h_eval[1], expected, rtol=1e-4, atol=1e-5)
    # ...and returns the statistics unchanged.
    _, same = model.apply(new_vars, x, train=False)
    chex.assert_trees_all_equal(same, stats)


# ---------------------------------------------------------------- scanned model vs loop

def _act(name):
    return activation_fn(name, leaky_slope=0.01)






def _reference_logits(cfg, variables, x):
    """A plain Python loop over blocks, from the same parameters (norm='none' or 'layer')."""
    linear = conv_same if cfg.arch == "conv" else dense
    lin_name = "Conv_0" if cfg.arch == "conv" else "Dense_0"
    act = _act(cfg.activation)

    def norm(p, z):
        if cfg.norm != "layer":
            return z
        mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
        return (z - mu) / jnp.sqrt(var + cfg.bn_epsilon) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]

    def layer(p, h):
        return act(norm(p, linear(p[lin_name], h)))

    params = variables["params"]
    h = x[..., None] if cfg.arch == "conv" else x
    preact = cfg.residual and cfg.residual_form == "preact"
    # The pre-activation network's stem has no activation: its blocks begin with one.
    h = norm(params["stem"], linear(params["stem"][lin_name], h)) if preact else layer(params["stem"], h)
    stacked = params["blocks"]["block"]
    for l in range(cfg.depth):
        p = jax.tree_util.tree_map(lambda a: a[l], stacked)
        if cfg.residual:
            alpha = {"inv_sqrt_depth": 1 / math.sqrt(cfg.depth)}.get(cfg.residual_scale, cfg.residual_scale)
            if cfg.residual_form == "preact":  # h + alpha * Dense(act(norm(Dense(act(norm(h))))))
                a = act(norm(p.get("layer_0"), h))  # no entry without norm parameters
                h = h + alpha * linear(p["branch_out"], layer(p["layer_1"], a))
            elif cfg.residual_form == "postact":  # act(h + alpha * norm(Dense(act(norm(Dense(h))))))
                a = layer(p["layer_0"], h)
                h = act(h + alpha * norm(p["layer_1"], linear(p["layer_1"][lin_name], a)))
            else:  # branch_act: h + alpha * act(norm(Dense(act(norm(Dense(h))))))
                h = h + alpha * layer(p["layer_1"], layer(p["layer_0"], h))
        else:
            h = layer(p["layer_0"], h)
    if cfg.arch == "conv":
        h = h.mean(1)
    return dense(params["head"], h)


@pytest.mark.parametrize("kw", [
    dict(activation="relu"),
    dict(activation="tanh", residual=True, residual_scale="inv_sqrt_depth"),
    dict(activation="sigmoid", residual=True, residual_scale=0.7, norm="layer"),
    dict(activation="gelu", arch="conv", kernel_size=3),
    dict(activation="elu", arch="conv", residual=True),
    dict(activation="tanh", residual=True, residual_form="postact", norm="layer", residual_scale=0.7),
    dict(activation="relu", arch="conv", residual=True, residual_form="postact"),
    dict(activation="sigmoid", residual=True, residual_form="branch_act", residual_scale=0.7),
])
def test_scanned_model_equals_python_loop_reference(kw):
    cfg = ModelConfig(depth=4, width=8, num_classes=3, bias_var=0.1, **kw)
    model = build(cfg)
    x = jax.random.normal(KEY, (5, 12))
    variables = model.init(KEY, x)
    logits, _ = model.apply(variables, x, train=False)
    np.testing.assert_allclose(logits, _reference_logits(cfg, variables, x), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kw", [dict(), dict(norm="batch"), dict(arch="conv", residual=True)])
def test_hidden_states_and_block_fn_compose_to_the_model(kw):
    cfg = ModelConfig(depth=3, width=6, num_classes=3, **kw)
    model = build(cfg)
    x = jax.random.normal(KEY, (4, 10))
    variables = model.init(KEY, x)
    for train in (True, False):
        hs = model.hidden_states(variables, x, train=train)
        assert hs.shape[0] == cfg.depth + 1
        for l in range(1, cfg.depth + 1):
            np.testing.assert_allclose(model.block_fn(variables, l, train=train)(hs[l - 1]), hs[l],
                                       rtol=1e-5, atol=1e-6)
        # block_fn accepts a traced block index (the analysis scans over l).
        traced = jax.jit(lambda l, h: model.block_fn(variables, l, train=train)(h))
        np.testing.assert_allclose(traced(2, hs[1]), hs[2], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scale", [0.0, "learnable_zero"])
def test_residual_block_with_zero_scale_is_identity(scale):
    model = build(ModelConfig(depth=5, width=7, residual=True, residual_scale=scale, norm="batch"))
    x = jax.random.normal(KEY, (4, 3))
    variables = model.init(KEY, x)
    hs = model.hidden_states(variables, x, train=True)
    for l in range(1, 6):
        np.testing.assert_array_equal(hs[l], hs[0])


def test_deep_model_initialises_and_compiles_quickly():
    # Scanned blocks: depth 1000 is one compiled loop body.
    cfg = ModelConfig(depth=1000, width=32, activation="tanh", residual=True, norm="batch")
    model = build(cfg)
    x = jnp.ones((4, 10))
    variables = model.init(KEY, x)
    block = variables["params"]["blocks"]["block"]  # pre-activation: layer_0 is [BN] -> act
    assert block["layer_1"]["Dense_0"]["kernel"].shape == (1000, 32, 32)
    assert block["branch_out"]["kernel"].shape == (1000, 32, 32)
    logits, stats = jax.jit(lambda v, x: model.apply(v, x, train=True))(variables, x)
    assert logits.shape == (4, 10) and np.isfinite(logits).all()


def test_identity_backward_keeps_forward_and_replaces_jacobian():
    model = build(ModelConfig(depth=3, width=5, activation="tanh", num_classes=2))
    x = jax.random.normal(KEY, (1, 4))
    variables = model.init(KEY, x)
    params = variables["params"]
    logits, _ = model.apply(variables, x, train=False)

    def input_jacobian(**identity):
        same, _ = model.apply(variables, x, train=False, **identity)
        np.testing.assert_array_equal(same, logits)  # the forward pass never changes
        return jax.jacrev(lambda x: model.apply(variables, x, train=False, **identity)[0][0])(x)[:, 0]

    # d logits / d x = W_head^T  M  diag(tanh'(stem)) W_stem^T, where M is the product of
    # block Jacobians: I when every block is identity-backward, prod W_l^T when only
    # the activations are (the stem keeps its own Jacobian: it changes the width).
    h0 = model.hidden_states(variables, x, train=False)[0][0]
    stem = np.diag(1 - np.asarray(h0) ** 2) @ np.asarray(params["stem"]["Dense_0"]["kernel"]).T
    head = np.asarray(params["head"]["kernel"]).T
    np.testing.assert_allclose(input_jacobian(identity_blocks=[1, 2, 3]), head @ stem, rtol=1e-5, atol=1e-6)
    kernels = np.asarray(params["blocks"]["block"]["layer_0"]["Dense_0"]["kernel"])
    linear_blocks = kernels[2].T @ kernels[1].T @ kernels[0].T
    np.testing.assert_allclose(input_jacobian(identity_sublayers=("activation",)),
                               head @ linear_blocks @ stem, rtol=1e-5, atol=1e-6)
    mask = jnp.array([True, True, True])
    np.testing.assert_allclose(input_jacobian(identity_blocks=mask), head @ stem, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="identity_blocks"):
        model.apply(variables, x, train=False, identity_blocks=[0])
    with pytest.raises(ValueError, match="identity_sublayers"):
        model.apply(variables, x, train=False, identity_sublayers=("conv",))


def test_conv_rejects_bad_input_rank():
    model = build(ModelConfig(arch="conv", depth=1, width=4))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        model.init(KEY, jnp.zeros((2, 3, 4, 5)))
