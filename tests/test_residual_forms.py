"""Residual blocks in each ``ModelConfig.residual_form``: the blocks against plain
JAX references built from the same parameters, the post-activation form against
the original ResNet definition, attribution and analysis for every form,
checkpoints, and the measured products and stream variance of wide networks at
initialisation against mean-field theory."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vgrad import ModelConfig
from vgrad.analysis import gradient_flow, jacobian_products, theory
from vgrad.config import RESIDUAL_FORMS
from vgrad.models import activation_fn, build
from vgrad.models.blocks import SUBLAYER_KINDS
from references import conv_same, dense

KEY = jax.random.key(0)


# ---------------------------------------------------------------- plain JAX references





def _reference(cfg: ModelConfig, train: bool):
    """(stem, block, head) of ``cfg`` written out in plain JAX, BatchNorm included:
    stem(params, stats, x), block(block_params, block_stats, h), head(params, h)."""
    linear = conv_same if cfg.arch == "conv" else dense
    lin = "Conv_0" if cfg.arch == "conv" else "Dense_0"
    act = activation_fn(cfg.activation, leaky_slope=cfg.leaky_slope)
    alpha = {"inv_sqrt_depth": 1 / math.sqrt(cfg.depth)}.get(cfg.residual_scale, cfg.residual_scale)

    def norm(p, s, z):
        if cfg.norm == "none":
            return z
        if cfg.norm == "layer":
            p = p["LayerNorm_0"]
            mu, var = z.mean(-1, keepdims=True), z.var(-1, keepdims=True)
            return (z - mu) / jnp.sqrt(var + cfg.bn_epsilon) * p["scale"] + p["bias"]
        p, s = p["BatchNorm_0"], s["BatchNorm_0"]
        axes = tuple(range(z.ndim - 1))  # every axis but the features
        mu, var = (z.mean(axes), z.var(axes)) if train else (s["mean"], s["var"])
        return (z - mu) / jnp.sqrt(var + cfg.bn_epsilon) * p["scale"] + p["bias"]

    def stem(params, stats, x):
        x = x[..., None] if cfg.arch == "conv" else x
        z = norm(params["stem"], stats.get("stem"), linear(params["stem"][lin], x))
        # Pre-activation networks: the stem is linear, the blocks begin with the activation.
        return z if cfg.residual and cfg.residual_form == "preact" else act(z)

    def block(p, s, h):
        if not cfg.residual:
            return act(norm(p["layer_0"], s.get("layer_0"), linear(p["layer_0"][lin], h)))
        if cfg.residual_form == "preact":  # h + alpha Dense(act(norm(Dense(act(norm(h))))))
            a = act(norm(p.get("layer_0"), s.get("layer_0"), h))
            a = act(norm(p["layer_1"], s.get("layer_1"), linear(p["layer_1"][lin], a)))
            return h + alpha * linear(p["branch_out"], a)
        if cfg.residual_form == "postact":  # act(h + alpha norm(Dense(act(norm(Dense(h))))))
            a = act(norm(p["layer_0"], s.get("layer_0"), linear(p["layer_0"][lin], h)))
            return act(h + alpha * norm(p["layer_1"], s.get("layer_1"), linear(p["layer_1"][lin], a)))
        a = act(norm(p["layer_0"], s.get("layer_0"), linear(p["layer_0"][lin], h)))  # branch_act
        return h + alpha * act(norm(p["layer_1"], s.get("layer_1"), linear(p["layer_1"][lin], a)))

    def head(params, h):
        return dense(params["head"], h.mean(1) if cfg.arch == "conv" else h)

    return stem, block, head


def _block_vars(variables, l):
    take = lambda tree: jax.tree_util.tree_map(lambda a: a[l - 1], tree["blocks"]["block"]) \
        if tree else {}
    return take(variables["params"]), take(variables["batch_stats"])


def _perturbed(variables, seed=0):
    """Variables with every parameter and running statistic moved off its init
    value (BatchNorm scales != 1, offsets != 0, running averages != batch statistics)."""
    leaves, treedef = jax.tree_util.tree_flatten(variables["params"])
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = treedef.unflatten([a + 0.2 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])
    # The running averages move; the residual scale alpha (also in batch_stats) stays cfg's.
    moved = lambda path, a: a if path[-1].key == "residual_scale" else \
        a + 0.3 * jax.random.uniform(KEY, a.shape)
    stats = jax.tree_util.tree_map_with_path(moved, variables["batch_stats"])
    return {"params": params, "batch_stats": stats}


def _form_config(form: str) -> ModelConfig:
    """One small BatchNorm network per form, shared by the tests below (one compile
    each); alpha = 1 as in He et al. (tests/test_models.py covers other alphas)."""
    return ModelConfig(depth=2, width=4, num_classes=3, norm="batch", residual=True,
                       residual_form=form, bias_var=0.1)


@functools.lru_cache(maxsize=None)
def _form_case(form: str):
    """(cfg, model, perturbed variables, x (3, 5))."""
    cfg = _form_config(form)
    model = build(cfg)
    x = jax.random.normal(KEY, (3, 5))
    return cfg, model, _perturbed(jax.jit(model.init)(KEY, x)), x


@pytest.mark.parametrize("form", RESIDUAL_FORMS)
def test_model_equals_plain_reference_for_each_form(form):
    """Stem, every block (``block_fn`` and ``hidden_states``) and logits against the
    plain references, BatchNorm in training and in eval mode. (tests/test_models.py
    checks every form without BatchNorm, mlp and conv.)"""
    cfg, model, variables, x = _form_case(form)
    for train in (True, False):
        stem, block, head = _reference(cfg, train)
        hs = model.hidden_states(variables, x, train=train)
        h = stem(variables["params"], variables["batch_stats"], x)
        np.testing.assert_allclose(hs[0], h, rtol=1e-4, atol=1e-5)
        for l in range(1, cfg.depth + 1):
            p, s = _block_vars(variables, l)
            # Each block from the model's own input, so errors do not compound.
            expected = block(p, s, hs[l - 1])
            np.testing.assert_allclose(model.block_fn(variables, l, train=train)(hs[l - 1]),
                                       expected, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(hs[l], expected, rtol=1e-4, atol=1e-5)
            h = block(p, s, h)
        logits, _ = model.apply(variables, x, train=train)
        np.testing.assert_allclose(logits, head(variables["params"], h), rtol=1e-4, atol=1e-4)


def test_postact_is_the_original_resnet_block():
    """He et al. 2015, eqs. (1)-(2) with BatchNorm after each weight layer (their
    Sec. 3.4): y = relu(x + BN2(W2 relu(BN1(W1 x)))), in training mode, alpha = 1."""
    cfg, model, variables, x = _form_case("postact")
    h = model.hidden_states(variables, x, train=True)[1]
    p, _ = _block_vars(variables, 2)

    def bn(q, z):  # batch statistics: mean and biased variance over the batch
        mu, var = z.mean(0), ((z - z.mean(0)) ** 2).mean(0)
        return q["scale"] * (z - mu) / jnp.sqrt(var + cfg.bn_epsilon) + q["bias"]

    w1, w2 = p["layer_0"]["Dense_0"], p["layer_1"]["Dense_0"]
    first = jax.nn.relu(bn(p["layer_0"]["BatchNorm_0"], h @ w1["kernel"] + w1["bias"]))
    expected = jax.nn.relu(h + bn(p["layer_1"]["BatchNorm_0"], first @ w2["kernel"] + w2["bias"]))
    np.testing.assert_allclose(model.block_fn(variables, 2, train=True)(h), expected,
                               rtol=1e-4, atol=1e-5)


def test_preact_default_parameters_and_stem():
    """The default form is pre-activation: its branch ends in a linear layer
    (``branch_out``), its first branch layer has no Dense, and its stem has no
    activation, so with relu the stream h^0 takes both signs; the other forms
    keep the activated stem."""
    assert ModelConfig().residual_form == "preact"
    for form in RESIDUAL_FORMS:
        _, model, variables, x = _form_case(form)
        block = variables["params"]["blocks"]["block"]
        h0 = np.asarray(model.hidden_states(variables, x, train=True)[0])
        if form == "preact":
            assert set(block) == {"layer_0", "layer_1", "branch_out"}
            assert set(block["layer_0"]) == {"BatchNorm_0"}
            assert (h0 < 0).mean() > 0.3
        else:
            assert set(block) == {"layer_0", "layer_1"}
            assert (h0 >= 0).all()
    with pytest.raises(ValueError, match="residual_form='pre'.*preact, postact, branch_act"):
        ModelConfig(residual=True, residual_form="pre")


@pytest.mark.parametrize("form", RESIDUAL_FORMS)
def test_attribution_switches_for_each_form(form):
    """With every sub-layer's Jacobian replaced by the identity, each residual
    block's Jacobian is (1 + alpha) I in every form (identity path + identity
    branch); with every block replaced, it is I. The forward pass never changes.
    (BatchNorm in eval mode, so the Jacobian is per example.)"""
    cfg, model, variables, x = _form_case(form)
    x = x[:1]
    logits, _ = model.apply(variables, x, train=False)
    head = np.asarray(variables["params"]["head"]["kernel"]).T
    stem = jax.jacrev(lambda x: model.hidden_states(variables, x, train=False)[0][0])(x)[:, 0]

    def input_jacobian(**identity):
        same, _ = model.apply(variables, x, train=False, **identity)
        np.testing.assert_array_equal(same, logits)
        return jax.jacrev(lambda x: model.apply(variables, x, train=False, **identity)[0][0])(x)[:, 0]

    full = input_jacobian()
    attributed = input_jacobian(identity_sublayers=SUBLAYER_KINDS)
    np.testing.assert_allclose(attributed, (1 + cfg.residual_scale) ** cfg.depth * head @ stem,
                               rtol=1e-5, atol=1e-6)
    assert not np.allclose(attributed, full, rtol=1e-2)
    np.testing.assert_allclose(input_jacobian(identity_blocks=list(range(1, cfg.depth + 1))),
                               head @ stem, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- analysis for every form

def _probe_sd(m: np.ndarray, k: int) -> float:
    """Standard deviation of mean_i ||u_i^T M||^2 over k unit-sphere probes u_i
    (see tests/test_analysis.py)."""
    n = m.shape[0]
    a = m @ m.T
    var = 2 * n / (n + 2) * (np.sum(a**2) - np.trace(a) ** 2 / n) / n**2
    return math.sqrt(max(var, 0.0) / k)


@pytest.mark.parametrize("form", ["preact", "postact"])
def test_analysis_functions_for_each_form(form):
    """jacobian_products against dense Jacobians of the plain reference blocks
    (whole-batch maps, BatchNorm in training mode), gradient_flow's hidden-state
    gradients against autodiff through the reference, and its activation
    statistics against the reference's post-activation values. (branch_act has
    the layout of vgrad's earlier block, which the analysis tests were written
    for; the default form is also in tests/test_analysis*.py's cases.)"""
    cfg, model, variables, x = _form_case(form)
    y = jnp.array([0, 1, 2])
    stem, block, head = _reference(cfg, train=True)
    hs = model.hidden_states(variables, x, train=True)
    n = hs[0].size
    jacs = [np.asarray(jax.jacfwd(lambda h, l=l: block(*_block_vars(variables, l), h))(hs[l - 1]),
                       np.float64).reshape(n, n) for l in range(1, cfg.depth + 1)]
    product = jacs[1] @ jacs[0]
    if form != "preact":  # the default form is in tests/test_analysis.py's dense checks
        k = 256
        report = jacobian_products(model, variables, x, train=True, key=KEY, num_probes=k)
        for l, jac in enumerate(jacs):
            msv = np.sum(jac**2) / n
            assert abs(report.layer_sq_norms[l] - msv) < 5 * _probe_sd(jac, k) + 1e-5 * msv
        msv = np.sum(product**2) / n
        assert abs(report.product_sq_norms[0] - msv) < 5 * _probe_sd(product, k) + 1e-5 * msv

    def loss_with_hidden_offsets(eps):  # eps (L+1, *h.shape) added to h^0 .. h^L
        h = stem(variables["params"], variables["batch_stats"], x) + eps[0]
        for l in range(1, cfg.depth + 1):
            h = block(*_block_vars(variables, l), h) + eps[l]
        logits = head(variables["params"], h)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    hidden = jax.grad(loss_with_hidden_offsets)(jnp.zeros((cfg.depth + 1, *hs[0].shape)))
    grads = gradient_flow(model, variables, {"x": x, "y": y}, train=True)
    np.testing.assert_allclose(grads.hidden_grad_norms,
                               np.sqrt(np.sum(np.asarray(hidden) ** 2, axis=(1, 2))), rtol=1e-4)
    assert grads.loss == pytest.approx(float(loss_with_hidden_offsets(jnp.zeros_like(hidden))),
                                       rel=1e-5)
    # Activation statistics of block l: both of its post-activation values, pooled.
    for l in range(1, cfg.depth + 1):
        p, s = _block_vars(variables, l)
        h = hs[l - 1]
        bn = lambda q, z: (z - z.mean(0)) / jnp.sqrt(z.var(0) + cfg.bn_epsilon) \
            * q["BatchNorm_0"]["scale"] + q["BatchNorm_0"]["bias"]
        relu = jax.nn.relu
        if form == "preact":
            a0 = relu(bn(p["layer_0"], h))
            a1 = relu(bn(p["layer_1"], dense(p["layer_1"]["Dense_0"], a0)))
        else:  # postact: the second activation's output is the block's output
            a0 = relu(bn(p["layer_0"], dense(p["layer_0"]["Dense_0"], h)))
            a1 = hs[l]
        acts = np.concatenate([np.ravel(a0), np.ravel(a1)])
        assert grads.activation_mean[l] == pytest.approx(acts.mean(), rel=1e-4, abs=1e-6)
        assert grads.activation_std[l] == pytest.approx(acts.std(), rel=1e-4)
        assert grads.dead_fraction[l] == pytest.approx(np.mean(acts <= 0))


def test_checkpoint_of_a_postact_network_restores(tmp_path):
    """The form travels with the checkpoint's config: the restored config builds
    a model that the restored variables fit (the default, preact, would not)."""
    from vgrad import DataConfig, TrainConfig, data
    from vgrad.checkpoint import restore_model_config, restore_variables
    from vgrad.loop import fit

    cfg, model, _, _ = _form_case("postact")
    ds = data.load_config(DataConfig(name="synthetic", options=(
        ("dim", 5), ("num_classes", 3), ("num_train", 16), ("num_test", 4))))
    run = tmp_path / "run"
    result = fit(model, TrainConfig(steps=2, batch_size=8), ds, run_dir=run, checkpoint_every=0,
                 progress=False)
    assert restore_model_config(run) == cfg
    restored = restore_variables(run)
    x = np.asarray(ds.x_train[:4])
    logits, _ = build(restore_model_config(run)).apply(restored, x, train=False)
    expected, _ = model.apply(result.state.variables, x, train=False)
    np.testing.assert_array_equal(logits, expected)
    wrong = dataclasses.replace(cfg, residual_form="preact")
    assert jax.tree_util.tree_structure(jax.eval_shape(build(wrong).init, KEY, x)) \
        != jax.tree_util.tree_structure(restored)


# ---------------------------------------------------------------- wide networks at init vs theory

@functools.lru_cache(maxsize=None)
def _programs(cfg: ModelConfig):
    model = build(cfg)
    return model, jax.jit(model.init), jax.jit(lambda v, x: model.hidden_states(v, x, train=True))


def _log_p0(cfg: ModelConfig, seeds: int, batch: int, num_probes: int, input_scale: float = 1.0):
    """Measured log ||P_0||^2/n per seed and the mean-field prediction from each
    seed's measured stem output (input N(0, input_scale^2), 16 features)."""
    model, init, hidden = _programs(cfg)
    measured, predicted = [], []
    for seed in range(seeds):
        x = input_scale * jax.random.normal(jax.random.key(1000 + seed), (batch, 16))
        variables = init(jax.random.key(seed), x)
        report = jacobian_products(model, variables, x, train=False, key=jax.random.key(seed),
                                   num_probes=num_probes)
        measured.append(report.log_product_sq_norms[0])
        h0 = np.asarray(hidden(variables, x)[0], np.float64)
        predicted.append(theory.predicted_log_product_sq_norms(
            cfg, input_second_moment=float(np.mean(h0**2)))[0])
    return np.asarray(measured), np.asarray(predicted)


@pytest.mark.parametrize("depth,scale,width,seeds", [(20, 1.0, 512, 16),
                                                     (100, "inv_sqrt_depth", 128, 4)])
def test_preact_relu_products_match_one_plus_alpha_squared_to_the_depth(depth, scale, width, seeds):
    """He-initialised pre-activation relu networks at init: ||P_0||^2/n = (1 + alpha^2)^L
    (each block adds a zero-mean branch with chi_branch = 1), within 10%.

    The ratio fluctuates from network to network: for alpha = 1 its log has a
    standard deviation ~0.2 at widths 256..1024 (the product's squared singular
    values are spread over decades, so few directions carry ||P_0||_F), hence 16
    networks (standard error ~5%); for alpha = 1/sqrt(L) ~0.04 (at width 128), hence 4."""
    cfg = ModelConfig(depth=depth, width=width, num_classes=3, residual=True, residual_scale=scale)
    alpha = 1.0 if scale == 1.0 else 1 / math.sqrt(depth)
    measured, predicted = _log_p0(cfg, seeds, batch=2, num_probes=4)
    np.testing.assert_allclose(predicted, depth * math.log1p(alpha**2), rtol=1e-9)
    ratio = math.exp(np.mean(measured) - depth * math.log1p(alpha**2))
    assert 0.9 < ratio < 1.1
    if scale == 1.0:  # a branch ending in relu adds a common positive mode: far larger
        legacy = dataclasses.replace(cfg, residual_form="branch_act")
        model, init, _ = _programs(legacy)
        x = jax.random.normal(jax.random.key(1000), (2, 16))
        report = jacobian_products(model, init(KEY, x), x, train=False, key=KEY, num_probes=4)
        # 10-40x at width 512 depending on the seed (16x for this one).
        assert report.log_product_sq_norms[0] > depth * math.log1p(alpha**2) + math.log(5)


def test_preact_tanh_products_match_the_propagated_prediction():
    """tanh's chi depends on the variance, which grows along the stream: the
    prediction propagated from the measured stem output follows the measurement."""
    cfg = ModelConfig(depth=20, width=256, num_classes=3, activation="tanh", init="glorot_normal",
                      residual=True)
    measured, predicted = _log_p0(cfg, seeds=2, batch=4, num_probes=4, input_scale=2.0)
    assert np.mean(predicted) > 3.0  # (1 + chi_branch) per block, chi_branch < 1 and falling
    assert abs(np.mean(measured) - np.mean(predicted)) < 0.1 * np.mean(predicted)


def test_stream_second_moment_with_batchnorm_grows_like_one_plus_l():
    """Pre-activation blocks with BatchNorm (De & Smith 2020): the stem's BatchNorm
    makes mean(h^0^2) = 1 and every branch BN -> relu -> Dense -> BN -> relu -> Dense
    adds a zero-mean term of second moment weight_var * E[relu(z)^2] = 1 (He),
    so mean(h^l^2) = 1 + l. A branch ending in relu (branch_act) adds its
    positive mean along one direction and grows much faster."""
    depth, width, batch, seeds = 50, 256, 32, 2
    levels = np.arange(depth + 1)
    for form in ("preact", "branch_act"):
        cfg = ModelConfig(depth=depth, width=width, num_classes=3, norm="batch", residual=True,
                          residual_form=form)
        _, init, hidden = _programs(cfg)
        second_moments = []
        for seed in range(seeds):
            x = jax.random.normal(jax.random.key(1000 + seed), (batch, 16))
            hs = np.asarray(hidden(init(jax.random.key(seed), x), x), np.float64)
            second_moments.append(np.mean(hs**2, axis=tuple(range(1, hs.ndim))))
        ratio = np.mean(second_moments, axis=0) / (1 + levels)
        if form == "preact":
            # Each branch's realised second moment has a ~1/sqrt(width * batch) error.
            np.testing.assert_allclose(ratio, 1.0, rtol=0.05)
        else:
            assert ratio[-1] > 2.0
