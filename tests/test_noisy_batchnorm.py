"""norm="noisy_batch": BatchNorm followed by a fresh per-step affine shift (Santurkar et al. 2018)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import ModelConfig, TrainConfig, data, sweep
from vgrad.config import ConfigError
from vgrad.models import build
from vgrad.models.blocks import NoisyBatchNorm

NOISE = 0.5


def _reference_bn(z: np.ndarray, eps: float = 1e-5) -> np.ndarray:
    """Batch normalisation with gamma = 1, beta = 0 (their initial values), in float64."""
    z = np.asarray(z, np.float64)
    return (z - z.mean(0)) / np.sqrt(z.var(0) + eps)


def _affine_fit(ref: np.ndarray, out: np.ndarray):
    """Per feature, the least-squares (scale, shift, max residual) of out against ref."""
    fits = []
    for j in range(ref.shape[1]):
        a = np.stack([ref[:, j], np.ones(len(ref))], 1)
        (s, m), *_ = np.linalg.lstsq(a, out[:, j], rcond=None)
        fits.append((s, m, np.abs(a @ [s, m] - out[:, j]).max()))
    return np.asarray(fits)


@pytest.fixture(scope="module")
def layer():
    module = NoisyBatchNorm(use_running_average=False, noise=NOISE)
    z = jax.random.normal(jax.random.key(0), (64, 6)) * 3.0 + 1.0
    variables = module.init(jax.random.key(1), z)
    return module, variables, z


def test_noisy_bn_is_bn_then_one_affine_map_per_feature_in_range(layer):
    module, variables, z = layer
    out, _ = module.apply(variables, z, mutable=["batch_stats"])
    fits = _affine_fit(_reference_bn(z), np.asarray(out, np.float64))
    scale, shift, residual = fits.T
    assert residual.max() < 1e-4  # the same (s, m) for every example of the batch
    assert np.all((scale >= 1 / (1 + NOISE) - 1e-4) & (scale <= 1 + NOISE + 1e-4))
    assert np.all(np.abs(shift) <= NOISE + 1e-4)
    assert np.ptp(scale) > 1e-3 and np.ptp(shift) > 1e-3  # drawn per feature, not one number


def test_noise_changes_every_step_and_eval_mode_is_plain_bn(layer):
    module, variables, z = layer
    out1, new = module.apply(variables, z, mutable=["batch_stats"])
    out2, newer = module.apply({**variables, **new}, z, mutable=["batch_stats"])
    stats = new["batch_stats"]
    assert int(stats["noise_step"]) == 1 and int(newer["batch_stats"]["noise_step"]) == 2
    assert float(jnp.abs(out1 - out2).max()) > 1e-2
    # The same state gives the same noise (a resumed run continues its sequence).
    again, _ = module.apply(variables, z, mutable=["batch_stats"])
    np.testing.assert_array_equal(np.asarray(out1), np.asarray(again))
    # Evaluation: the running averages (updated once with momentum 0.9), no noise.
    evaluate = NoisyBatchNorm(use_running_average=True, noise=NOISE)
    out_eval = evaluate.apply({**variables, **new}, z)
    mean = 0.1 * np.asarray(z, np.float64).mean(0)
    var = 0.9 + 0.1 * np.asarray(z, np.float64).var(0)
    np.testing.assert_allclose(np.asarray(out_eval), (np.asarray(z) - mean) / np.sqrt(var + 1e-5),
                               rtol=1e-4, atol=1e-4)


def test_zero_noise_is_batchnorm_and_layers_draw_their_own_noise():
    cfg = ModelConfig(depth=3, width=8, norm="noisy_batch", bn_noise=0.0)
    x = jax.random.normal(jax.random.key(2), (16, 5))
    noisy = build(cfg)
    v = noisy.init(jax.random.key(0), x)
    seeds = np.asarray(v["batch_stats"]["blocks"]["block"]["layer_0"]["NoisyBatchNorm_0"]["noise_seed"])
    assert len(set(seeds.tolist())) == 3  # one seed per block
    plain = build(ModelConfig(depth=3, width=8, norm="batch"))
    pv = plain.init(jax.random.key(0), x)
    # Same kernels; the BN parameters sit one module deeper in the noisy model.
    fixed = {"params": _renamed(v["params"]), "batch_stats": _renamed(v["batch_stats"], drop_noise=True)}
    out_noisy, _ = noisy.apply(v, x, train=True)
    out_plain, _ = plain.apply(fixed, x, train=True)
    np.testing.assert_allclose(np.asarray(out_noisy), np.asarray(out_plain), rtol=1e-5, atol=1e-6)
    assert jax.tree_util.tree_structure(fixed["params"]) == jax.tree_util.tree_structure(pv["params"])


def _renamed(tree, drop_noise=False):
    """The noisy model's variables in the plain BatchNorm model's layout."""
    out = {}
    for k, val in tree.items():
        if k == "NoisyBatchNorm_0":
            val = dict(val)
            out["BatchNorm_0"] = val.pop("BatchNorm_0")
            if not drop_noise:
                out.update(val)
        else:
            out[k] = _renamed(val, drop_noise) if isinstance(val, dict) else val
    return out


def test_noisy_bn_trains_in_a_sweep():
    ds = data.load("digits")
    runs = sweep.variants({"noisy": {"model.norm": "noisy_batch"}, "bn": {"model.norm": "batch"}},
                          model=ModelConfig(depth=2, width=16),
                          train=TrainConfig(steps=30, batch_size=32, eval_every=30), seeds=2)
    result = sweep.run(runs, ds, progress=False)
    assert all(r.status == "completed" for r in result.runs)
    noisy = [r for r in result.runs if r.label == "noisy"]
    assert min(r.final["test_accuracy"] for r in noisy) > 0.3  # chance is 0.1


def test_bad_noise_names_the_field():
    with pytest.raises(ConfigError, match="bn_noise"):
        ModelConfig(norm="noisy_batch", bn_noise=-1.0)
    with pytest.raises(ConfigError, match="noisy_batch"):
        ModelConfig(norm="noisy")
