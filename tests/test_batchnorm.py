"""vgrad.batchnorm: BatchNorm's variable counts and the recomputed population statistics,
checked against numpy written out from the parameters (no Flax in the reference)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import ModelConfig
from vgrad.batchnorm import batchnorm_paths, count_variables, recompute_batch_stats
from vgrad.models import build

EPS = 1e-5


def _model(depth=2, width=6, **kw):
    cfg = ModelConfig(depth=depth, width=width, norm="batch", activation="relu",
                      init="he_normal", bn_epsilon=EPS, **kw)
    model = build(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((4, 5)))
    # Non-trivial gamma / beta, so a reference that ignored them would disagree.
    rng = np.random.default_rng(1)
    params = jax.tree_util.tree_map(lambda a: a + 0.3 * rng.standard_normal(a.shape).astype(a.dtype),
                                    variables["params"])
    return model, {"params": params, "batch_stats": variables["batch_stats"]}


def _data(n, dim=5, seed=2):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32) + 0.5


def _numpy_bn_layer(z, bn, stats):
    """Normalise z (B, n) with its own batch statistics (training mode, biased var) and
    record them in ``stats`` (a list)."""
    mu, var = z.mean(0), z.var(0)
    stats.append((mu, var))
    return (z - mu) / np.sqrt(var + EPS) * bn["scale"] + bn["bias"]


def _numpy_batch_stats(params, x_b):
    """Per-layer (mean, var) of the BatchNorm inputs of one batch, training mode, in float64:
    stem, then block 1..L."""
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    stats = []
    z = x_b.astype(np.float64) @ p["stem"]["Dense_0"]["kernel"] + p["stem"]["Dense_0"]["bias"]
    h = np.maximum(_numpy_bn_layer(z, p["stem"]["BatchNorm_0"], stats), 0)
    blocks = p["blocks"]["block"]["layer_0"]
    for l in range(blocks["Dense_0"]["kernel"].shape[0]):
        z = h @ blocks["Dense_0"]["kernel"][l] + blocks["Dense_0"]["bias"][l]
        bn = {k: v[l] for k, v in blocks["BatchNorm_0"].items()}
        h = np.maximum(_numpy_bn_layer(z, bn, stats), 0)
    return stats


def test_first_layer_statistics_are_the_whole_set_mean_and_variance():
    """The stem's BatchNorm input x W + b does not depend on batching: its population
    statistics are numpy's mean and (biased) variance over all N examples."""
    model, variables = _model(depth=1)
    x = _data(96)
    new = recompute_batch_stats(model, variables, x, batch_size=16)
    p = variables["params"]["stem"]["Dense_0"]
    z = x.astype(np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
    stem = new["batch_stats"]["stem"]["BatchNorm_0"]
    np.testing.assert_allclose(stem["mean"], z.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stem["var"], z.var(0), rtol=1e-4, atol=1e-5)
    # params are untouched, and the old statistics (mean 0, var 1 at init) are replaced.
    assert new["params"] is variables["params"]
    assert not np.allclose(stem["var"], 1.0)


def test_deeper_layers_average_the_per_batch_statistics():
    """Block l's statistics are E_k[mu_k] and E_k[var_k] + Var_k[mu_k] over the batches k,
    with earlier layers normalised by batch statistics: a numpy forward pass per batch."""
    model, variables = _model(depth=3)
    x, batch = _data(100), 20  # 5 full batches
    new = recompute_batch_stats(model, variables, x, batch_size=batch)
    per_batch = [_numpy_batch_stats(variables["params"], x[i:i + batch]) for i in range(0, 100, batch)]
    mus = np.asarray([[s[0] for s in b] for b in per_batch])   # (K, L+1, width)
    vars_ = np.asarray([[s[1] for s in b] for b in per_batch])
    want_mean, want_var = mus.mean(0), vars_.mean(0) + mus.var(0)
    got = new["batch_stats"]
    np.testing.assert_allclose(got["stem"]["BatchNorm_0"]["mean"], want_mean[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["stem"]["BatchNorm_0"]["var"], want_var[0], rtol=1e-4, atol=1e-5)
    blocks = got["blocks"]["block"]["layer_0"]["BatchNorm_0"]
    np.testing.assert_allclose(blocks["mean"], want_mean[1:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(blocks["var"], want_var[1:], rtol=1e-4, atol=1e-5)
    # The variance of the batch means matters: leaving it out would be measurably different.
    assert np.abs(mus.var(0)[1:]).max() > 1e-3
    # Examples past the last full batch are not used.
    more = recompute_batch_stats(model, variables, np.concatenate([x, _data(7, seed=9)]),
                                 batch_size=batch)
    for a, b in zip(jax.tree_util.tree_leaves(more["batch_stats"]),
                    jax.tree_util.tree_leaves(new["batch_stats"])):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw", [{}, {"residual": True}, {"arch": "conv", "kernel_size": 3}])
def test_one_batch_makes_evaluation_mode_equal_training_mode(kw):
    """With the whole set as one batch, the population statistics are that batch's: the
    evaluation-mode network then computes exactly the training-mode one (any block form)."""
    model, variables = _model(depth=3, **kw)
    x = _data(64)
    new = recompute_batch_stats(model, variables, x, batch_size=64)
    train_logits, _ = model.apply(variables, x, train=True)
    eval_before, _ = model.apply(variables, x, train=False)
    eval_after, _ = model.apply(new, x, train=False)
    np.testing.assert_allclose(eval_after, train_logits, rtol=1e-3, atol=1e-4)
    assert np.abs(np.asarray(eval_before) - np.asarray(train_logits)).max() > 1e-2


def test_momentum_and_running_averages_do_not_matter():
    """The result depends on the params and the data only, not on bn_momentum or on the
    running averages the variables held before."""
    model, variables = _model(depth=2)
    other = build(ModelConfig(depth=2, width=6, norm="batch", activation="relu", bn_momentum=0.99,
                              bn_epsilon=EPS))
    x = _data(48)
    stale = {**variables, "batch_stats": jax.tree_util.tree_map(lambda a: a + 3.0,
                                                                variables["batch_stats"])}
    a = recompute_batch_stats(model, variables, x, batch_size=16)
    b = recompute_batch_stats(other, stale, x, batch_size=16)
    for u, v in zip(jax.tree_util.tree_leaves(a["batch_stats"]), jax.tree_util.tree_leaves(b["batch_stats"])):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7)


def test_recompute_refuses_bad_input_and_leaves_models_without_batchnorm_alone():
    model, variables = _model(depth=1)
    with pytest.raises(ValueError, match="batch_size"):
        recompute_batch_stats(model, variables, _data(8), batch_size=0)
    with pytest.raises(ValueError, match="fewer than one full batch"):
        recompute_batch_stats(model, variables, _data(8), batch_size=16)
    with pytest.raises(TypeError, match="vgrad model"):
        recompute_batch_stats(object(), variables, _data(8), batch_size=4)
    plain = build(ModelConfig(depth=2, width=6))
    v = plain.init(jax.random.key(0), jnp.zeros((4, 5)))
    assert recompute_batch_stats(plain, v, _data(8), batch_size=4) is v


def test_count_variables_matches_the_closed_form():
    """Dense MLP 5 -> w -> (L blocks of w -> w) -> 10 with BatchNorm after every Dense:
    2w gamma/beta and 2w running statistics per BatchNorm layer, L + 1 layers."""
    L, w = 3, 6
    model, variables = _model(depth=L, width=w)
    counts = count_variables(variables)
    assert counts["stem"] == {"params": 5 * w + w + 2 * w, "bn_params": 2 * w, "bn_stats": 2 * w,
                              "bn_layers": 1}
    assert counts["blocks"] == {"params": L * (w * w + w + 2 * w), "bn_params": 2 * w * L,
                                "bn_stats": 2 * w * L, "bn_layers": L}
    assert counts["head"] == {"params": w * 10 + 10, "bn_params": 0, "bn_stats": 0, "bn_layers": 0}
    assert counts["total"]["bn_layers"] == L + 1
    leaves = jax.tree_util.tree_leaves(variables["params"])
    assert counts["total"]["params"] == sum(np.size(a) for a in leaves)
    plain = build(ModelConfig(depth=L, width=w))
    counts = count_variables(plain.init(jax.random.key(0), jnp.zeros((2, 5))))
    assert counts["total"]["bn_params"] == counts["total"]["bn_stats"] == 0
    assert counts["total"]["params"] == 5 * w + w + L * (w * w + w) + w * 10 + 10
    assert len(batchnorm_paths(variables["batch_stats"])) == 2  # stem + the stacked blocks
    # Shapes alone give the same counts (jax.eval_shape: nothing allocated).
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((4, 5)))
    assert count_variables(shapes) == count_variables(model.init(jax.random.key(0), jnp.zeros((4, 5))))
