"""Data-pipeline check: the MNIST-1D paper's small MLP reaches its published
accuracy through vgrad's public training API.

Greydanus & Kobak, "Scaling down deep learning with MNIST-1D" (2024): an MLP
Linear 40 -> 100, ReLU, one residual block h + ReLU(Linear 100 -> 100 h),
Linear 100 -> 10, PyTorch's default initialisation, Adam lr 1e-2, batch 100,
6000 steps. The paper reports 68 % test accuracy, its notebooks 64.6-65.1 %.
Chance is 10 %; a broken pipeline (labels misaligned with inputs, a wrong
split, inputs scrambled) lands far below the band.
"""

import jax
import jax.numpy as jnp
import numpy as np

import vgrad
from vgrad import TrainConfig, data


def _torch_default(key, fan_in, shape):
    """PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (weights and biases)."""
    bound = 1.0 / np.sqrt(fan_in)
    return jax.random.uniform(key, shape, minval=-bound, maxval=bound)


def _dense(key, n_in, n_out):
    kw, kb = jax.random.split(key)
    return {"w": _torch_default(kw, n_in, (n_in, n_out)), "b": _torch_default(kb, n_in, (n_out,))}


def paper_mlp():
    """The paper's model as a vgrad layered model (depth 1: the residual block)."""
    return vgrad.models.layered(
        stem=lambda p, x: jax.nn.relu(x @ p["w"] + p["b"]),
        block=lambda p, h, l: h + jax.nn.relu(h @ p["w"] + p["b"]),
        head=lambda p, h: h @ p["w"] + p["b"],
        depth=1,
        init_stem=lambda key, x: _dense(key, x.shape[-1], 100),
        init_block=lambda key, h: _dense(key, 100, 100),
        init_head=lambda key, h: _dense(key, 100, 10),
        activation="relu")


def test_mnist1d_paper_mlp_reaches_the_published_accuracy():
    ds = data.load("mnist1d")
    assert (ds.num_train, ds.x_train.shape[1], len(ds.y_test), ds.num_classes) == (4000, 40, 1000, 10)
    cfg = TrainConfig(optimizer="adam", learning_rate=1e-2, momentum=0.0, batch_size=100,
                      steps=6000, eval_every=6000)
    result = vgrad.loop.fit(paper_mlp(), cfg, ds, seeds=2, progress=False)
    assert result.status == "completed"
    accuracy = np.asarray(result.final["test_accuracy"])
    # Published band 64.6-68 %, widened by two seeds' spread (a few points on 1000 test examples).
    assert np.all((accuracy > 0.60) & (accuracy < 0.74)), accuracy
    assert np.mean(result.final["train_accuracy"]) > np.mean(accuracy)  # it fits its training set
    # The same model through vgrad's analysis: a protocol model, like vgrad's own.
    variables = jax.tree_util.tree_map(lambda a: a[0], result.state.variables)
    report = vgrad.analysis.gradient_flow(paper_mlp(), variables,
                                          {"x": jnp.asarray(ds.x_test[:64]),
                                           "y": jnp.asarray(ds.y_test[:64])}, train=False)
    assert report.weight_grad_norms.shape == (1,) and np.isfinite(report.loss)
