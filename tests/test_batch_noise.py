"""vgrad.batch_noise against the closed form for i.i.d. samples and against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import ModelConfig, batch_noise, models


@pytest.fixture(scope="module")
def spread():
    """Monte-Carlo spreads of three Gaussian units (different means and scales), one
    uniform unit (kurtosis 1.8) and one exponential unit (kurtosis 9)."""
    rng = np.random.default_rng(0)
    n = 200_000
    h = np.stack([rng.normal(0.0, 1.0, n), rng.normal(5.0, 3.0, n), rng.normal(-2.0, 0.5, n),
                  rng.uniform(-1.0, 1.0, n), rng.exponential(2.0, n)], axis=1).astype(np.float32)
    return batch_noise.batch_statistic_spread(h, [2, 4, 16, 64], 4000, jax.random.key(0))


def test_batch_moments_are_batchnorms_mean_and_biased_variance():
    a = np.random.default_rng(1).normal(3.0, 2.0, (7, 4)).astype(np.float32)
    mean, var = batch_noise.batch_moments(jnp.asarray(a))
    np.testing.assert_allclose(mean, a.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, a.var(0), rtol=1e-4)  # ddof=0, as BatchNorm


def test_closed_form_for_gaussian_data_is_the_textbook_one():
    b = np.array([2, 3, 10, 100])
    p = batch_noise.predicted_spread(b, 3.0)
    np.testing.assert_allclose(p["mean_spread"], 1 / np.sqrt(b))
    # Gaussian: Var(s^2) = 2 sigma^4 / (B - 1); the biased variance is (B-1)/B s^2.
    np.testing.assert_allclose(p["var_spread"], (b - 1) / b * np.sqrt(2 / (b - 1)))
    np.testing.assert_allclose(p["var_bias"], (b - 1) / b)
    assert batch_noise.predicted_spread([4], np.array([3.0, 9.0]))["var_spread"].shape == (1, 2)


def test_measured_shapes_and_population_moments(spread):
    assert spread["mean_spread"].shape == spread["var_spread"].shape == (4, 5)
    np.testing.assert_array_equal(spread["batch_sizes"], [2, 4, 16, 64])
    np.testing.assert_allclose(spread["population_mean"][:3], [0.0, 5.0, -2.0], atol=0.02)
    np.testing.assert_allclose(spread["population_var"][:3], [1.0, 9.0, 0.25], rtol=0.02)
    # Kurtosis E[(x-mu)^4]/sigma^4: 3 (Gaussian), 1.8 (uniform), 9 (exponential).
    np.testing.assert_allclose(spread["kurtosis"], [3, 3, 3, 1.8, 9], rtol=0.06)


def test_spread_of_the_batch_mean_is_one_over_sqrt_b(spread):
    ratio = spread["mean_spread"] / spread["predicted_mean_spread"][:, None]
    np.testing.assert_allclose(ratio, 1.0, atol=0.06)  # 4000 batches: ~1 % error of a std


def test_spread_of_the_batch_variance_follows_the_kurtosis_corrected_form(spread):
    light = spread["var_spread"][:, :4] / spread["predicted_var_spread"][:, :4]
    np.testing.assert_allclose(light, 1.0, atol=0.08)
    # The exponential unit (heavy tail: a noisy estimate at B = 2) from B = 4 on ...
    heavy = spread["var_spread"][1:, 4] / spread["predicted_var_spread"][1:, 4]
    np.testing.assert_allclose(heavy, 1.0, atol=0.15)
    # ... where the Gaussian form sqrt(2/(B-1)) is off by about a factor two.
    b = spread["batch_sizes"][1:]
    gaussian = (b - 1) / b * np.sqrt(2 / (b - 1))
    assert np.all(spread["var_spread"][1:, 4] > 1.6 * gaussian)
    # The mean of BatchNorm's biased batch variance is (B-1)/B of the population's.
    np.testing.assert_allclose(spread["var_bias"][:, :4],
                               np.broadcast_to(spread["predicted_var_bias"][:, None], (4, 4)), atol=0.03)


def test_batch_fn_is_applied_to_each_batch():
    h = np.random.default_rng(2).normal(1.0, 2.0, (5000, 3)).astype(np.float32)
    key = jax.random.key(1)
    plain = batch_noise.batch_statistic_spread(h, [4, 32], 500, key)
    # A per-example map that scales and shifts: relative spreads unchanged (same batches).
    scaled = batch_noise.batch_statistic_spread(h, [4, 32], 500, key, batch_fn=_affine, fn_args=3.0)
    np.testing.assert_allclose(scaled["mean_spread"], plain["mean_spread"], rtol=1e-4)
    np.testing.assert_allclose(scaled["var_spread"], plain["var_spread"], rtol=1e-3)
    # A map that standardises each batch (BatchNorm without affine): the statistics of its
    # output do not move at all from batch to batch.
    normed = batch_noise.batch_statistic_spread(h, [4, 32], 500, key, batch_fn=_standardise)
    assert np.all(normed["mean_spread"] < 1e-5) and np.all(normed["var_spread"] < 1e-3)


def test_sampling_without_replacement_shrinks_the_spread_by_the_finite_population_factor():
    h = np.random.default_rng(3).normal(size=(64, 2)).astype(np.float32)
    out = batch_noise.batch_statistic_spread(h, [32, 64], 2000, jax.random.key(2), replace=False)
    # Var(mean) = sigma^2 / B (N - B) / (N - 1): 32 of 64 rows -> factor sqrt(32/63); all rows -> 0.
    np.testing.assert_allclose(out["mean_spread"][0], np.sqrt(32 / 63) / np.sqrt(32), rtol=0.08)
    assert np.all(out["mean_spread"][1] < 1e-5) and np.all(out["var_spread"][1] < 1e-4)


def test_bad_arguments_are_refused():
    h = np.zeros((10, 2), np.float32)
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_noise.batch_statistic_spread(h, [1, 4], 10, jax.random.key(0))
    with pytest.raises(ValueError, match="batch_sizes"):
        batch_noise.batch_statistic_spread(h, [20], 10, jax.random.key(0), replace=False)
    with pytest.raises(ValueError, match="num_batches"):
        batch_noise.batch_statistic_spread(h, [4], 1, jax.random.key(0))
    with pytest.raises(ValueError, match="layer"):
        batch_noise.PreNormLayers(ModelConfig(depth=2, width=4), (0, 3))
    with pytest.raises(ValueError, match="plain MLP"):
        model = models.build(ModelConfig(depth=2, width=4, residual=True))
        batch_noise.pre_norm_activations(model, None, None, train=False)
    # A constant unit has no population variance: NaN, not a division by zero.
    out = batch_noise.batch_statistic_spread(h, [2], 5, jax.random.key(0))
    assert np.all(np.isnan(out["mean_spread"]))


def test_pre_norm_activations_are_what_batchnorm_normalises():
    """relu(BN_batch(z_l)) with z_l the pre-norm activation is the hidden state h^l."""
    cfg = ModelConfig(depth=3, width=16, norm="batch", activation="relu")
    model = models.build(cfg)
    x = jax.random.normal(jax.random.key(3), (32, 40))
    variables = jax.jit(model.init)(jax.random.key(4), x)
    # Non-trivial BN affine parameters, so the check is not of the default scale 1 / bias 0.
    rng = np.random.default_rng(5)
    variables = {**variables, "params": jax.tree_util.tree_map(
        lambda a: a + 0.1 * rng.normal(size=a.shape).astype(np.float32), variables["params"])}
    layers = batch_noise.PreNormLayers(cfg, (0, 2))

    @jax.jit  # one program, not hundreds of eager ones
    def run(v, x):
        return (batch_noise.pre_norm_activations(model, v, x, train=True),
                model.hidden_states(v, x, train=True), layers(v, x))

    z, hidden, picked = run(variables, x)
    assert z.shape == (cfg.depth + 1, 32, cfg.width)
    p = variables["params"]
    stem, blocks = p["stem"]["BatchNorm_0"], p["blocks"]["block"]["layer_0"]["BatchNorm_0"]
    scales = [stem["scale"], *blocks["scale"]]
    biases = [stem["bias"], *blocks["bias"]]
    for l in range(cfg.depth + 1):
        zl = np.asarray(z[l], np.float64)
        normed = (zl - zl.mean(0)) / np.sqrt(zl.var(0) + cfg.bn_epsilon)
        expected = np.maximum(normed * np.asarray(scales[l]) + np.asarray(biases[l]), 0)
        np.testing.assert_allclose(np.asarray(hidden[l]), expected, atol=2e-4)
    np.testing.assert_allclose(picked, np.concatenate([z[0], z[2]], -1), atol=1e-5)
    assert hash(layers) == hash(batch_noise.PreNormLayers(cfg, (0, 2)))  # one program per config


def _affine(a, x):
    return a * x - 7.0


def _standardise(_, x):
    return (x - x.mean(0)) / x.std(0)
