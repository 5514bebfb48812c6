"""vgrad.analysis.gradient_direction_probe against closed-form references.

Reference model: multinomial logistic regression, logits = x W + b, whose
cross-entropy gradient and Hessian have closed forms, written here in numpy
float64 (no autodiff): ∇_W L = xᵀ(P - Y)/B, ∇_b L = mean(P - Y), and
H = (1/B) Σ_i (diag p_i - p_i p_iᵀ) ⊗ x̃_i x̃_iᵀ with x̃_i = (x_i, 1).
"""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from vgrad import ModelConfig
from vgrad.analysis import gradient_direction_probe
from vgrad.models import build

B, D, C = 12, 5, 4


class LinearSoftmax:
    """The smallest model with vgrad's functional face: apply -> (logits, batch_stats)."""

    def apply(self, variables, x, *, train):
        del train
        p = variables["params"]
        return x @ p["w"] + p["b"], variables["batch_stats"]


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, D)).astype(np.float32)
    y = rng.integers(0, C, size=B).astype(np.int32)
    params = {"w": (0.5 * rng.normal(size=(D, C))).astype(np.float32),
              "b": (0.1 * rng.normal(size=C)).astype(np.float32)}
    return x, y, {"params": params, "batch_stats": {}}


def _softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _np_loss_grad(w, b, x, y):
    """Closed-form mean cross-entropy and its gradient (flattened [W, b]) in float64."""
    x, w, b = (np.asarray(a, np.float64) for a in (x, w, b))
    p = _softmax(x @ w + b)
    onehot = np.eye(C)[y]
    loss = -np.mean(np.log(p[np.arange(len(y)), y]))
    r = (p - onehot) / len(y)
    return loss, np.concatenate([(x.T @ r).ravel(), r.sum(0)])


def _np_hessian(w, b, x):
    """Closed-form Hessian of the mean cross-entropy in the flattened [W, b] order."""
    x64 = np.asarray(x, np.float64)
    p = _softmax(x64 @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    xt = np.concatenate([x64, np.ones((len(x64), 1))], 1)  # (B, D+1)
    h = np.zeros((D + 1, C, D + 1, C))
    for pi, xi in zip(p, xt):
        h += np.einsum("a,b,cd->acbd", xi, xi, np.diag(pi) - np.outer(pi, pi))
    h /= len(x64)
    # Reorder rows (d, c) of [W (D, C) | b (C,)] to the flattening W.ravel() then b.
    order = [d * C + c for d in range(D) for c in range(C)] + [D * C + c for c in range(C)]
    flat = h.reshape((D + 1) * C, (D + 1) * C)
    return flat[np.ix_(order, order)]


def test_probe_matches_the_closed_form_gradient_and_losses():
    x, y, variables = _problem()
    eta = np.array([0.05, 0.2, 0.5, 1.0])
    out = gradient_direction_probe(LinearSoftmax(), variables, x, y, eta)
    w, b = variables["params"]["w"], variables["params"]["b"]
    loss0, g = _np_loss_grad(w, b, x, y)
    assert out["loss"] == pytest.approx(loss0, rel=1e-5)
    assert out["grad_norm"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
    losses, distances = [], []
    for e in eta:
        g_w, g_b = g[:D * C].reshape(D, C), g[D * C:]
        loss_e, g_e = _np_loss_grad(w - e * g_w, b - e * g_b, x, y)
        losses.append(loss_e)
        distances.append(np.linalg.norm(g - g_e))
    np.testing.assert_allclose(out["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(out["grad_distances"], distances, rtol=1e-4, atol=1e-7)
    assert out["loss_variation"] == pytest.approx(max(losses) - min(losses), rel=1e-4)
    assert out["gradient_predictiveness"] == pytest.approx(max(distances), rel=1e-4)
    beta = np.asarray(distances) / (eta * np.linalg.norm(g))
    assert out["effective_beta"] == pytest.approx(beta.max(), rel=1e-4)
    # Small steps along -g lower the loss (a descent direction).
    assert out["losses"][0] < out["loss"]


def test_effective_beta_of_a_tiny_step_is_the_hessian_curvature_along_the_gradient():
    """As η -> 0, ‖∇L(θ) - ∇L(θ - ηg)‖ / ‖ηg‖ -> ‖H ĝ‖, ĝ = g/‖g‖ (first-order Taylor)."""
    x, y, variables = _problem(1)
    w, b = variables["params"]["w"], variables["params"]["b"]
    _, g = _np_loss_grad(w, b, x, y)
    expected = np.linalg.norm(_np_hessian(w, b, x) @ (g / np.linalg.norm(g)))
    out = gradient_direction_probe(LinearSoftmax(), variables, x, y, [2e-2])
    assert out["effective_beta"] == pytest.approx(expected, rel=0.03)
    # ... and it never exceeds the largest Hessian eigenvalue along the path by much
    # (cross-entropy of a linear model: the curvature is bounded by λ_max(H) at θ, nearby).
    lam_max = np.linalg.eigvalsh(_np_hessian(w, b, x)).max()
    assert out["effective_beta"] <= lam_max * 1.05


def test_probe_of_a_batchnorm_network_moves_only_the_parameters():
    """A vgrad BN network: the probe equals a direct computation with jax.grad and the
    same (unchanged) batch statistics, in training and in evaluation mode."""
    model = build(ModelConfig(depth=2, width=8, num_classes=3, norm="batch"))
    rng = np.random.default_rng(2)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=16).astype(np.int32)
    variables = jax.jit(model.init)(jax.random.key(0), x)  # jitted: eager init is slow
    # Non-trivial running averages, so train=False differs from train=True.
    variables = {**variables, "batch_stats": jax.tree_util.tree_map(
        lambda a: a + 0.3, variables["batch_stats"])}
    eta = [0.1, 0.4]
    for train in (True, False):
        def loss_fn(params):
            logits, _ = model.apply({**variables, "params": params}, x, train=train)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

        flat, unravel = jax.flatten_util.ravel_pytree(variables["params"])
        flat_loss = jax.jit(lambda v: loss_fn(unravel(v)))
        flat_grad = jax.jit(jax.grad(flat_loss))
        g = flat_grad(flat)
        out = gradient_direction_probe(model, variables, x, y, eta, train=train)
        assert out["loss"] == pytest.approx(float(flat_loss(flat)), rel=1e-5)
        for k, e in enumerate(eta):
            assert out["losses"][k] == pytest.approx(float(flat_loss(flat - e * g)), rel=1e-5)
            g_e = flat_grad(flat - e * g)
            assert out["grad_distances"][k] == pytest.approx(float(jnp.linalg.norm(g - g_e)),
                                                             rel=1e-4)
    train_loss = gradient_direction_probe(model, variables, x, y, eta, train=True)["loss"]
    eval_loss = gradient_direction_probe(model, variables, x, y, eta, train=False)["loss"]
    assert abs(train_loss - eval_loss) > 1e-4


def test_probe_refuses_bad_step_sizes_and_labels():
    x, y, variables = _problem()
    for bad in ([], [0.1, 0.0], [-1.0], [np.nan]):
        with pytest.raises(ValueError, match="invalid step_sizes"):
            gradient_direction_probe(LinearSoftmax(), variables, x, y, bad)
    with pytest.raises(ValueError, match="invalid y"):
        gradient_direction_probe(LinearSoftmax(), variables, x, y.astype(np.float32), [0.1])
