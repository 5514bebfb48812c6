"""Training: metrics from the step, clipping bounds, determinism, and that learning works."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vgrad import ModelConfig, TrainConfig, data
from vgrad.models import build
from vgrad.loop import fit
from vgrad.steps import block_norms, part_norms
from vgrad.train import create_state, make_eval_step, make_optimizer, make_train_step

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_step_metrics_come_from_the_same_backward_pass():
    model = build(ModelConfig(depth=3, width=8, num_classes=3, norm="batch", residual=True))
    x = jax.random.normal(KEY, (16, 5))
    batch = {"x": x, "y": jnp.arange(16) % 3}
    cfg = TrainConfig(learning_rate=0.1)
    state = create_state(model, cfg, KEY, x)
    params = state.params

    def loss(p):
        logits, _ = model.apply({"params": p, "batch_stats": state.batch_stats}, x, train=True)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    expected_loss, grads = jax.value_and_grad(loss)(params)
    per_block = [sum(float(jnp.sum(g[l] ** 2)) for g in jax.tree_util.tree_leaves(grads["blocks"]))
                 for l in range(3)]
    total = sum(float(jnp.sum(g ** 2)) for g in jax.tree_util.tree_leaves(grads))
    expected_loss, per_block, total = float(expected_loss), np.sqrt(per_block), np.sqrt(total)
    new_state, metrics = make_train_step(model, cfg)(state, batch)
    np.testing.assert_allclose(metrics["loss"], expected_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["block_grad_norms"], per_block, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], total, rtol=1e-5)
    assert int(new_state.step) == 1 and bool(metrics["finite"])


def _clipped_update(clip, grads, params, value):
    tx = make_optimizer(TrainConfig(optimizer="sgd", momentum=0.0, learning_rate=1.0, clip=clip,
                                    clip_value=value))
    updates, _ = tx.update(grads, tx.init(params), params)
    return jax.tree_util.tree_map(lambda u: -u, updates)  # sgd with lr 1: update = -clipped grad


def test_global_norm_clipping_bounds_the_global_norm_and_keeps_direction():
    grads = {"a": jnp.full((3,), 4.0), "b": jnp.full((2, 2), -3.0)}
    out = _clipped_update("global_norm", grads, grads, 2.0)
    np.testing.assert_allclose(optax.tree.norm(out), 2.0, rtol=1e-6)
    scale = 2.0 / float(optax.tree.norm(grads))
    np.testing.assert_allclose(out["a"], grads["a"] * scale, rtol=1e-6)
    small = {"a": jnp.full((3,), 0.1)}
    np.testing.assert_allclose(_clipped_update("global_norm", small, small, 2.0)["a"], 0.1, rtol=1e-6)


def test_value_clipping_bounds_every_entry():
    grads = {"a": jnp.array([-5.0, 0.3, 2.0])}
    np.testing.assert_allclose(_clipped_update("value", grads, grads, 1.0)["a"], [-1.0, 0.3, 1.0])


def test_adaptive_clipping_bounds_unitwise_ratio_per_layer_and_unit():
    # Units are output features of one layer; stacked block kernels (L, in, out) are per layer.
    rng = np.random.default_rng(0)
    params = {"head": jnp.array([[1.0, 0.01], [2.0, 0.01]]),
              "blocks": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 5)) * [[[1.0]], [[0.1]], [[3.0]]]),
                         "bias": jnp.asarray(rng.normal(size=(3, 5)))}}
    grads = {"head": jnp.array([[10.0, 1e-4], [10.0, 1e-4]]),
             "blocks": {"kernel": jnp.asarray(rng.normal(size=(3, 4, 5))),
                        "bias": jnp.asarray(rng.normal(size=(3, 5)))}}
    out = _clipped_update("agc", grads, params, 0.1)

    def check(g, p, g_clipped, reduce_axes):
        unit_g = np.linalg.norm(np.asarray(g), axis=reduce_axes)
        unit_w = np.maximum(np.linalg.norm(np.asarray(p), axis=reduce_axes), 1e-3)
        unit_out = np.linalg.norm(np.asarray(g_clipped), axis=reduce_axes)
        np.testing.assert_allclose(unit_out, np.minimum(unit_g, 0.1 * unit_w), rtol=1e-5)

    check(grads["head"], params["head"], out["head"], 0)
    np.testing.assert_allclose(out["head"][:, 1], grads["head"][:, 1])  # small gradient untouched
    for l in range(3):
        check(grads["blocks"]["kernel"][l], params["blocks"]["kernel"][l], out["blocks"]["kernel"][l], 0)
        check(grads["blocks"]["bias"][l], params["blocks"]["bias"][l], out["blocks"]["bias"][l], None)


def test_same_config_and_seed_give_identical_metrics(digits):
    model = build(ModelConfig(depth=2, width=16, norm="batch"))
    cfg = TrainConfig(steps=15, batch_size=32, eval_every=5)
    first = fit(model, cfg, digits, progress=False)
    second = fit(model, cfg, digits, progress=False)
    assert first.history == second.history
    other = fit(model, TrainConfig(steps=15, batch_size=32, eval_every=5, seed=1), digits, progress=False)
    assert other.history != first.history


def test_fit_writes_metrics_and_evaluates(digits, tmp_path):
    from vgrad.io import read_jsonl

    model = build(ModelConfig(depth=2, width=16))
    result = fit(model, TrainConfig(steps=12, batch_size=64, eval_every=4), digits, run_dir=tmp_path,
                 progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert records == result.history
    train_steps = [r["step"] for r in records if "loss" in r]
    eval_steps = [r["step"] for r in records if "test_accuracy" in r]
    assert train_steps == list(range(1, 13)) and eval_steps == [4, 8, 12]
    assert len(records[0]["block_grad_norms"]) == 2
    assert result.status == "completed" and result.final["step"] == 12


def test_eval_step_uses_running_averages_or_batch_statistics():
    model = build(ModelConfig(depth=2, width=8, norm="batch", num_classes=3))
    x = 5.0 + jax.random.normal(KEY, (32, 4))
    batch = {"x": x, "y": jnp.arange(32) % 3}
    state = create_state(model, TrainConfig(), KEY, x)
    running = make_eval_step(model)(state, batch)
    batch_mode = make_eval_step(model, train=True)(state, batch)
    logits_eval, _ = model.apply(state.variables, x, train=False)
    logits_train, _ = model.apply(state.variables, x, train=True)
    expected = optax.softmax_cross_entropy_with_integer_labels
    np.testing.assert_allclose(running["losses"], expected(logits_eval, batch["y"]), rtol=1e-5)
    np.testing.assert_allclose(batch_mode["losses"], expected(logits_train, batch["y"]), rtol=1e-5)
    assert not np.allclose(running["losses"], batch_mode["losses"])
    np.testing.assert_array_equal(running["correct"], np.argmax(logits_eval, -1) == batch["y"])


def test_small_mlp_learns_digits(digits):
    model = build(ModelConfig(depth=2, width=64))
    result = fit(model, TrainConfig(epochs=8, batch_size=64), digits, progress=False)
    assert result.final["test_accuracy"] > 0.93


def test_mlp_beats_chance_and_logistic_regression_on_mnist1d(tmp_path_factory):
    from sklearn.linear_model import LogisticRegression

    ds = data.load("mnist1d", cache_dir=tmp_path_factory.mktemp("cache"))
    logistic = LogisticRegression(max_iter=1000).fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)
    model = build(ModelConfig(depth=2, width=256))
    result = fit(model, TrainConfig(optimizer="adam", learning_rate=2e-3, epochs=20, batch_size=128),
                 ds, progress=False)
    accuracy = result.final["test_accuracy"]
    assert accuracy > 0.1 + 0.3, accuracy  # chance is 0.1
    assert accuracy > logistic + 0.1, (accuracy, logistic)


def test_gradient_norms_of_vanishing_and_huge_gradients_are_not_lost():
    """Block norms are scaled before squaring: float32 sqrt(sum(g^2)) is exactly 0 below
    ~1e-19 and inf above ~1e19; the scaled norm matches float64 across 60 decades."""
    rng = np.random.default_rng(0)
    scales = np.array([1e-30, 1e-21, 1.0, 1e21, 0.0])
    kernel = rng.normal(size=(5, 4, 3)) * scales[:, None, None]
    bias = rng.normal(size=(5, 3)) * scales[:, None]
    tree = {"blocks": {"k": jnp.asarray(kernel, jnp.float32), "b": jnp.asarray(bias, jnp.float32)},
            "stem": {"w": jnp.asarray(kernel[0], jnp.float32)}}
    expected = np.sqrt((kernel.reshape(5, -1) ** 2).sum(1) + (bias**2).sum(1))
    np.testing.assert_allclose(np.asarray(block_norms(tree)), expected, rtol=1e-5)
    assert float(block_norms(tree)[-1]) == 0.0
    np.testing.assert_allclose(float(part_norms(tree)["stem"]), np.linalg.norm(kernel[0]), rtol=1e-5)
    # Non-finite values stay non-finite (the step's divergence checks depend on it).
    for bad in (np.nan, np.inf, -np.inf):
        broken = np.asarray(kernel, np.float32).copy()
        broken[2, 0, 0] = bad
        norms = np.asarray(block_norms({"blocks": {"k": jnp.asarray(broken)}}))
        assert not np.isfinite(norms[2]) and np.isfinite(np.delete(norms, 2)).all()
