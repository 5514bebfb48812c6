"""vgrad.analysis.gradient_flow against plain autodiff of the full loss, and its
attribution and activation statistics."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import vgrad.models
from vgrad.analysis import gradient_flow
from vgrad.config import ModelConfig

from analysis_setup import case, setup
from vgrad.models.blocks import Network




def autodiff_reference(model, variables, x, y, train):
    """Plain autodiff of the full loss: (loss, parameter gradients) from
    ``model.apply``, and ||dLoss/dh^l|| (l = 0..L) by adding zero perturbations
    eps_l to every hidden state of an independently written forward pass
    (block_fn loop + a jnp head), whose loss is returned too."""
    cfg = model.cfg

    @jax.jit
    def run(variables, x, y):
        def real_loss(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=train)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        hs = model.hidden_states(variables, x, train=train)
        head = variables["params"]["head"]

        def perturbed_loss(eps):
            h = hs[0] + eps[0]
            for l in range(1, cfg.depth + 1):
                h = model.block_fn(variables, l, train=train)(h) + eps[l]
            pooled = h.mean(axis=1) if cfg.arch == "conv" else h
            logits = pooled @ head["kernel"] + head["bias"]
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(real_loss)(variables["params"])
        ref_value, hidden = jax.value_and_grad(perturbed_loss)(jnp.zeros_like(hs))
        hidden_norms = jnp.sqrt(jnp.sum(hidden.reshape(cfg.depth + 1, -1) ** 2, axis=1))
        return value, grads, ref_value, hidden_norms

    value, grads, ref_value, hidden_norms = run(variables, x, y)
    return float(value), grads, float(ref_value), np.asarray(hidden_norms)


@functools.lru_cache(maxsize=None)
def _hidden_states_fn(cfg: ModelConfig, train: bool):
    model = vgrad.models.build(cfg)
    return jax.jit(lambda variables, x: model.hidden_states(variables, x, train=train))


def hidden_states(model, variables, x, train=True) -> np.ndarray:
    return np.asarray(_hidden_states_fn(model.cfg, train)(variables, x))


def real_model_stem_grad(model, variables, x, y, train, **attribution):
    """dLoss/dh^0 of the real model (with attribution) via a perturbation of the stem output."""

    @jax.jit
    def run(variables, x, y):
        hs = model.hidden_states(variables, x, train=train)

        def loss(eps):
            def interceptor(next_fun, args, kwargs, context):
                out = next_fun(*args, **kwargs)
                if isinstance(context.module, Network) and context.method_name == "stem":
                    return out + eps
                return out

            with nn.intercept_methods(interceptor):
                logits, _ = model.apply(variables, x, train=train, **attribution)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        return jnp.linalg.norm(jax.grad(loss)(jnp.zeros_like(hs[0])))

    return float(run(variables, x, y))


GRAD_CASES = ["mlp-tanh", "conv-relu-bn-residual-train", "conv-tanh-bn-eval"]


@pytest.mark.parametrize("name", GRAD_CASES)
def test_gradient_flow_matches_autodiff(name):
    model, variables, x, train = case(name)
    cfg = model.cfg
    y = jnp.array([0, 2, 1])
    report = gradient_flow(model, variables, {"x": x, "y": y}, train=train)

    value, grads, ref_value, ref_hidden = autodiff_reference(model, variables, x, y, train)
    assert report.loss == pytest.approx(value, rel=1e-6)
    leaves = [np.asarray(a, np.float64) for a in jax.tree_util.tree_leaves(grads["blocks"])]
    expected = [math.sqrt(sum(np.sum(leaf[l] ** 2) for leaf in leaves)) for l in range(cfg.depth)]
    np.testing.assert_allclose(report.weight_grad_norms, expected, rtol=1e-5)
    global_norm = lambda tree: math.sqrt(sum(np.sum(np.asarray(a, np.float64) ** 2)
                                             for a in jax.tree_util.tree_leaves(tree)))
    assert report.stem_grad_norm == pytest.approx(global_norm(grads["stem"]), rel=1e-5)
    assert report.head_grad_norm == pytest.approx(global_norm(grads["head"]), rel=1e-5)
    assert ref_value == pytest.approx(value, rel=1e-5)  # the reference computes the real loss
    np.testing.assert_allclose(report.hidden_grad_norms, ref_hidden, rtol=1e-4)
    assert report.hidden_grad_norms.shape == (cfg.depth + 1,)
    for stat in (report.activation_mean, report.activation_std, report.saturated_fraction,
                 report.dead_fraction):
        assert stat.shape == (cfg.depth + 1,)
    json.dumps(report.to_dict())


def test_attribution_all_blocks_identity_gives_constant_hidden_grads():
    model, variables, x, train = case("conv-relu-bn-residual-train")
    cfg = model.cfg
    batch = {"x": x, "y": jnp.array([0, 2, 1])}
    base = gradient_flow(model, variables, batch, train=train)
    ident = gradient_flow(model, variables, batch, train=train,
                          identity_blocks=list(range(1, cfg.depth + 1)))
    assert ident.loss == base.loss  # forward pass unchanged
    np.testing.assert_allclose(ident.hidden_grad_norms, base.hidden_grad_norms[-1], rtol=1e-6)
    # The last block's weight gradient does not depend on anything below it.
    assert ident.weight_grad_norms[-1] == pytest.approx(base.weight_grad_norms[-1], rel=1e-6)
    assert ident.identity_blocks == (1, 2, 3)
    # Same via a boolean mask.
    masked = gradient_flow(model, variables, batch, train=train,
                           identity_blocks=np.ones(cfg.depth, bool))
    np.testing.assert_allclose(masked.hidden_grad_norms, ident.hidden_grad_norms)


@pytest.mark.parametrize("attribution", [
    {"identity_blocks": [2]},
    {"identity_blocks": [1], "identity_sublayers": ("norm",)},
])
def test_attributed_hidden_grads_match_the_real_models_backward_pass(attribution):
    model, variables, x, train = case("conv-relu-bn-residual-train")
    y = jnp.array([0, 2, 1])
    report = gradient_flow(model, variables, {"x": x, "y": y}, train=train, **attribution)
    base = gradient_flow(model, variables, {"x": x, "y": y}, train=train)
    expected = real_model_stem_grad(model, variables, x, y, train, **attribution)
    assert report.hidden_grad_norms[0] == pytest.approx(expected, rel=1e-5)
    assert report.hidden_grad_norms[0] != pytest.approx(base.hidden_grad_norms[0], rel=1e-3)
    assert report.hidden_grad_norms[-1] == pytest.approx(base.hidden_grad_norms[-1], rel=1e-6)
    assert report.loss == base.loss
    assert report.identity_sublayers == tuple(attribution.get("identity_sublayers", ()))


RELU = ModelConfig(depth=3, width=6, num_classes=3, activation="relu", bias_var=0.1)


def test_attribution_closed_form_and_errors():
    model, variables, x = setup(RELU, batch=4)
    batch = {"x": x, "y": jnp.array([0, 1, 2, 0])}
    base = gradient_flow(model, variables, batch)
    # Without its dense and activation Jacobians a plain block's Jacobian is I,
    # so the gradient reaches every layer unchanged; the forward pass is untouched.
    ident = gradient_flow(model, variables, batch, identity_sublayers=("dense", "activation"))
    np.testing.assert_allclose(ident.hidden_grad_norms, base.hidden_grad_norms[-1], rtol=1e-6)
    assert ident.loss == base.loss
    assert not np.allclose(base.hidden_grad_norms, base.hidden_grad_norms[-1], rtol=1e-2)
    with pytest.raises(ValueError, match="identity_sublayers"):
        gradient_flow(model, variables, batch, identity_sublayers=("bogus",))
    with pytest.raises(ValueError, match="identity_blocks"):
        gradient_flow(model, variables, batch, identity_blocks=[0])
    with pytest.raises(ValueError, match="mask"):
        gradient_flow(model, variables, batch, identity_blocks=np.ones(2, bool))


def scale_kernels(variables, factor):
    params = jax.tree_util.tree_map_with_path(
        lambda path, a: a * factor if "kernel" in jax.tree_util.keystr(path) else a,
        variables["params"])
    return {**variables, "params": params}


def test_activation_statistics():
    # relu, plain blocks: the dead fraction is the fraction of exactly-zero hidden units.
    model, variables, x = setup(RELU, batch=4)
    batch = {"x": x, "y": jnp.array([0, 1, 2, 0])}
    rep = gradient_flow(model, variables, batch)
    hs = hidden_states(model, variables, x)
    assert 0.1 < rep.dead_fraction.mean() < 0.9
    np.testing.assert_allclose(rep.dead_fraction, [(h == 0).mean() for h in hs], atol=1e-7)
    np.testing.assert_allclose(rep.activation_mean, hs.reshape(4, -1).mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(rep.activation_std, hs.reshape(4, -1).std(axis=1), atol=1e-6)
    assert np.all(np.isnan(rep.saturated_fraction))

    # tanh: huge weights saturate almost every unit, the initial ones few.
    model, variables, x, train = case("mlp-tanh")
    batch = {"x": x, "y": jnp.array([0, 1, 2])}
    for scaled, low, high in ((scale_kernels(variables, 1000.0), 0.8, 1.0),
                              (variables, 0.0, 0.2)):
        rep = gradient_flow(model, scaled, batch, train=train)
        assert np.all((rep.saturated_fraction[1:] >= low) & (rep.saturated_fraction[1:] <= high))
        hs = hidden_states(model, scaled, x)
        # saturated <=> tanh'(z) = 1 - h^2 < 5% of its maximum 1
        np.testing.assert_allclose(rep.saturated_fraction, [(1 - h**2 < 0.05).mean() for h in hs])
        assert np.all(np.isnan(rep.dead_fraction))

    # Residual BatchNorm blocks: statistics pool both branch layers; after
    # train-mode BatchNorm (zero offset) about half the pre-activations are <= 0.
    model, variables, x, train = case("conv-relu-bn-residual-train")
    rep = gradient_flow(model, variables, {"x": x, "y": jnp.array([0, 1, 2])}, train=train)
    assert np.all((rep.dead_fraction > 0.2) & (rep.dead_fraction < 0.8))


def test_vanishing_weight_gradients_are_reported_not_zero():
    """A naive sigmoid network's early-block gradients are ~1e-30: gradient_flow reports
    their norms as float64 computes them from the float32 gradient, not as 0."""
    cfg = ModelConfig(depth=12, width=16, num_classes=3, activation="sigmoid", init="normal",
                      init_std=0.01)
    model = vgrad.models.build(cfg)
    x = jax.random.normal(jax.random.key(0), (8, 5))
    y = jnp.arange(8) % 3
    variables = model.init(jax.random.key(1), x)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    grads = jax.grad(loss)(variables["params"])
    leaves = [np.asarray(a, np.float64).reshape(cfg.depth, -1)
              for a in jax.tree_util.tree_leaves(grads["blocks"])]
    expected = np.sqrt(sum((a**2).sum(1) for a in leaves))
    assert expected[0] < 1e-20 < expected[0] * 1e30  # tiny, yet representable
    got = gradient_flow(model, variables, {"x": x, "y": y}).weight_grad_norms
    np.testing.assert_allclose(got, expected, rtol=1e-4)
