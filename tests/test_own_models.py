"""Your own model: ``vgrad.models.layered`` and the linen / NNX adapters,
analysed by the same code as vgrad's models and checked against dense
``jax.jacfwd`` Jacobians and plain autodiff written independently of the
adapters; where a model is the same network as a vgrad model, the analysis
gives the same numbers as for that model.

Estimator tolerances are numbers of standard deviations of the probe
estimator (closed form, as in test_analysis.py).
"""

from __future__ import annotations

import functools
import gc
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import vgrad.models
from analysis_setup import msv, probe_sd
from vgrad.analysis import gradient_flow, jacobian_products, jacobian_spectrum, top_singular_values
from vgrad.analysis.jacobians import _cache_key
from vgrad.config import ModelConfig

SIGMAS = 5.0
K = 4096  # probes where estimates are compared with dense references
DEPTH, WIDTH, CLASSES, BATCH, IN = 3, 8, 3, 4, 5
Y = jnp.array([0, 1, 2, 1])


def inputs(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, IN))


# ---- dense references ------------------------------------------------------


def dense_chain(block_maps, h0):
    """Hidden states, dense J_l = jacfwd(block l) (n x n, float64) and
    P_l = J_L ... J_{l+1} for python functions block_maps[l-1]: h^{l-1} -> h^l."""
    @jax.jit  # one compilation instead of op-by-op dispatch (much faster here)
    def run(h0):
        hs, jacs = [h0], []
        for f in block_maps:
            jacs.append(jax.jacfwd(f)(hs[-1]))
            hs.append(f(hs[-1]))
        return hs, jacs

    hs, jacs = run(h0)
    L, n = len(jacs), h0.size
    jacs = [np.asarray(j, np.float64).reshape(n, n) for j in jacs]
    prods = [None] * L + [np.eye(n)]
    for l in range(L, 0, -1):
        prods[l - 1] = prods[l] @ jacs[l - 1]
    return hs, jacs, prods


def assert_products_match(report, jacs, prods):
    L = len(jacs)
    assert report.log_product_sq_norms.shape == (L + 1,) and report.log_product_sq_norms[L] == 0
    assert report.numel == jacs[0].shape[0]
    for l in range(L):
        for estimate, m in ((report.product_sq_norms[l], prods[l]),
                            (report.layer_sq_norms[l], jacs[l])):
            exact = msv(m)
            assert abs(estimate - exact) <= SIGMAS * probe_sd(m, K) + 1e-5 * exact, (l, exact)


def assert_same_report(a, b, rtol=1e-5):
    """Two reports of the same network (the analysis sees the same numbers)."""
    for field in ("log_layer_sq_norms", "log_product_sq_norms", "weight_grad_norms",
                  "hidden_grad_norms", "activation_mean", "activation_std",
                  "saturated_fraction", "dead_fraction"):
        if hasattr(a, field):
            np.testing.assert_allclose(getattr(a, field), getattr(b, field), rtol=rtol,
                                       atol=1e-6, err_msg=field)
    for field in ("loss", "stem_grad_norm", "head_grad_norm"):
        if hasattr(a, field):
            assert getattr(a, field) == pytest.approx(getattr(b, field), rel=rtol), field


def norm(tree) -> float:
    return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2))
                         for a in jax.tree_util.tree_leaves(tree)))


def cross_entropy(logits, y=Y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def hidden_grad_norms(block_maps, head_map, h0):
    """||dLoss/dh^l||, l = 0..L, by zero perturbations added to every h^l of a python loop."""
    def loss(eps):
        h = h0 + eps[0]
        for l, f in enumerate(block_maps, start=1):
            h = f(h) + eps[l]
        return cross_entropy(head_map(h))

    g = jax.jit(jax.grad(loss))(jnp.zeros((len(block_maps) + 1, *h0.shape)))
    return np.sqrt(np.sum(np.asarray(g, np.float64).reshape(len(g), -1) ** 2, axis=1))


# ---- a tanh MLP in plain jax.numpy ------------------------------------------


def stem(params, x):
    return jnp.tanh(x @ params["kernel"] + params["bias"])


def block(params_l, h, l):
    return jnp.tanh(h @ params_l["kernel"] + params_l["bias"])


def head(params, h):
    return h @ params["kernel"] + params["bias"]


def dense_init(fan_out):
    def init(key, h):
        w = jax.random.normal(key, (h.shape[-1], fan_out)) * math.sqrt(1.5 / h.shape[-1])
        return {"kernel": w, "bias": jnp.full((fan_out,), 0.1)}
    return init


TANH_CFG = ModelConfig(depth=DEPTH, width=WIDTH, num_classes=CLASSES, activation="tanh",
                       init="variance_scaling", weight_var=1.5, bias_var=0.1)


@functools.lru_cache(maxsize=None)
def tanh_case():
    """(vgrad's model, its variables, the jnp model, its variables): one network."""
    own = vgrad.models.build(TANH_CFG)
    own_vars = jax.jit(own.init)(jax.random.key(1), inputs())  # jitted: eager init is slow
    p = own_vars["params"]
    mine = vgrad.models.layered(stem, block, head, DEPTH, activation="tanh")
    my_vars = {"params": {"stem": p["stem"]["Dense_0"],
                          "blocks": p["blocks"]["block"]["layer_0"]["Dense_0"],
                          "head": p["head"]}}
    return own, own_vars, mine, my_vars


def jnp_maps(params):
    """(block maps h^{l-1} -> h^l for l = 1..L, head map) of the jnp MLP."""
    def block_map(l):
        params_l = jax.tree_util.tree_map(lambda a: a[l - 1], params["blocks"])
        return lambda h: block(params_l, h, l)
    return [block_map(l) for l in range(1, DEPTH + 1)], lambda h: head(params["head"], h)


def test_jnp_mlp_jacobians_match_jacfwd_and_vgrad_model():
    own, own_vars, mine, my_vars = tanh_case()
    x = inputs()
    blocks, _ = jnp_maps(my_vars["params"])
    hs, jacs, prods = dense_chain(blocks, stem(my_vars["params"]["stem"], x))
    np.testing.assert_allclose(mine.hidden_states(my_vars, x, train=True), np.stack(hs), rtol=1e-6)

    report = jacobian_products(mine, my_vars, x, train=True, key=jax.random.key(7), num_probes=K)
    assert_products_match(report, jacs, prods)
    assert_same_report(report, jacobian_products(own, own_vars, x, train=True,
                                                 key=jax.random.key(7), num_probes=K))

    sv = jacobian_spectrum(mine, my_vars, x, train=True)
    np.testing.assert_allclose(sv, np.linalg.svd(prods[0], compute_uv=False), rtol=1e-4,
                               atol=1e-5 * sv[0])
    top = top_singular_values(mine, my_vars, x, train=True, key=jax.random.key(0), k=2,
                              num_iters=100)
    np.testing.assert_allclose(top, sv[:2], rtol=1e-3)


def test_jnp_mlp_gradient_flow_matches_autodiff_and_vgrad_model():
    own, own_vars, mine, my_vars = tanh_case()
    x = inputs()
    batch = {"x": x, "y": Y}
    report = gradient_flow(mine, my_vars, batch)

    def loss(params):
        blocks, head_map = jnp_maps(params)
        h = stem(params["stem"], x)
        for f in blocks:
            h = f(h)
        return cross_entropy(head_map(h))

    value, grads = jax.jit(jax.value_and_grad(loss))(my_vars["params"])
    assert report.loss == pytest.approx(float(value), rel=1e-6)
    np.testing.assert_allclose(
        report.weight_grad_norms,
        [norm(jax.tree_util.tree_map(lambda a: a[l], grads["blocks"])) for l in range(DEPTH)],
        rtol=1e-5)
    assert report.stem_grad_norm == pytest.approx(norm(grads["stem"]), rel=1e-5)
    assert report.head_grad_norm == pytest.approx(norm(grads["head"]), rel=1e-5)
    blocks, head_map = jnp_maps(my_vars["params"])
    h0 = stem(my_vars["params"]["stem"], x)
    np.testing.assert_allclose(report.hidden_grad_norms, hidden_grad_norms(blocks, head_map, h0),
                               rtol=1e-4)
    # activation="tanh": statistics of h^l = tanh(.), saturated where 1 - h^2 < 0.05.
    hs = np.asarray(mine.hidden_states(my_vars, x, train=True))
    np.testing.assert_allclose(report.saturated_fraction,
                               [(1 - h**2 < 0.05).mean() for h in hs], atol=1e-7)
    assert np.all(np.isnan(report.dead_fraction))
    assert_same_report(report, gradient_flow(own, own_vars, batch))

    # Attribution by identity blocks: block 2's backward is the identity, so
    # dLoss/dh^1 = dLoss/dh^2, and vgrad's model agrees.
    ident = gradient_flow(mine, my_vars, batch, identity_blocks=[2])
    assert ident.hidden_grad_norms[1] == pytest.approx(ident.hidden_grad_norms[2], rel=1e-6)
    assert ident.hidden_grad_norms[1] != pytest.approx(report.hidden_grad_norms[1], rel=1e-3)
    assert ident.loss == report.loss and ident.identity_blocks == (2,)
    assert_same_report(ident, gradient_flow(own, own_vars, batch, identity_blocks=[2]))
    with pytest.raises(ValueError, match="identity_sublayers.*identity_blocks only"):
        gradient_flow(mine, my_vars, batch, identity_sublayers=("norm",))


def test_layered_init_and_protocol_errors():
    x = inputs()
    mine = vgrad.models.layered(stem, block, head, DEPTH, init_stem=dense_init(WIDTH),
                                init_block=dense_init(WIDTH), init_head=dense_init(CLASSES))
    variables = mine.init(jax.random.key(0), x)
    shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
    assert shapes == {"stem": {"kernel": (IN, WIDTH), "bias": (WIDTH,)},
                      "blocks": {"kernel": (DEPTH, WIDTH, WIDTH), "bias": (DEPTH, WIDTH)},
                      "head": {"kernel": (WIDTH, CLASSES), "bias": (CLASSES,)}}
    kernels = variables["params"]["blocks"]["kernel"]
    assert not np.allclose(kernels[0], kernels[1])  # one key per block
    logits, stats = mine.apply(variables, x, train=True)
    assert logits.shape == (BATCH, CLASSES) and stats == {}
    h = mine.hidden_states(variables, x, train=False)
    np.testing.assert_allclose(mine.block_fn(variables, 2, train=False)(h[1]), h[2], rtol=1e-6)
    np.testing.assert_allclose(mine.head_fn(variables, train=False)(h[-1]), logits, rtol=1e-6)

    # Block l gets the 1-based index l (as a traced int32 in the scan): h^l = l! h^0.
    scale = vgrad.models.layered(stem, lambda p, h, l: h * l.astype(h.dtype), head, DEPTH)
    h = scale.hidden_states(variables, x, train=False)
    np.testing.assert_allclose(h[1:], h[0] * np.array([1, 2, 6])[:, None, None], rtol=1e-6)
    np.testing.assert_allclose(scale.block_fn(variables, 3, train=False)(h[0]), 3 * h[0])

    with pytest.raises(ValueError, match="init_stem, init_block, init_head"):
        vgrad.models.layered(stem, block, head, DEPTH).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="blocks run from 1 to 3"):
        mine.block_fn(variables, 0, train=False)
    widen = lambda p, h, l: jnp.concatenate([h, h], axis=-1)
    with pytest.raises(ValueError, match="shape-preserving"):
        jacobian_products(vgrad.models.layered(stem, widen, head, DEPTH), variables, x,
                          train=True, key=jax.random.key(0))
    unstacked = {"params": {**variables["params"], "blocks": jax.tree_util.tree_map(
        lambda a: a[:2], variables["params"]["blocks"])}}
    with pytest.raises(ValueError, match="leading axis of length depth=3"):
        mine.apply(unstacked, x, train=True)
    with pytest.raises(TypeError, match="missing block_fn"):
        jacobian_products(types.SimpleNamespace(depth=3, hidden_states=None), variables, x,
                          train=True, key=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_coupled=True, block must return a pair"):
        coupled = vgrad.models.layered(lambda p, x, **kw: (stem(p, x), {}),
                                       lambda p, h, l, **kw: block(p, h, l),
                                       lambda p, h, **kw: (head(p, h), {}), DEPTH,
                                       batch_coupled=True)
        coupled.apply(variables, x, train=True)


class Scaling:
    """The bare protocol without a cache key: block l multiplies h by ``scale``."""

    def __init__(self, scale: float):
        self.depth, self.scale = 2, scale

    def hidden_states(self, variables, x, *, train):
        return jnp.stack([x * self.scale**l for l in range(self.depth + 1)])

    def block_fn(self, variables, l, *, train):
        return lambda h: h * self.scale


def test_cache_keys_for_user_models():
    x = inputs()
    # Objects without a cache_key are keyed on themselves: two instances of one
    # class never share compiled functions (||J||^2/n = scale^2 exactly).
    for scale in (0.5, 2.0):
        report = jacobian_products(Scaling(scale), {}, x, train=True, key=jax.random.key(0),
                                   num_probes=2)
        np.testing.assert_allclose(report.log_layer_sq_norms, 2 * math.log(scale), rtol=1e-5)
        np.testing.assert_allclose(report.log_product_sq_norms,
                                   [4 * math.log(scale), 2 * math.log(scale), 0], rtol=1e-5)
    # The identity key holds a weak reference: once its model is gone it equals
    # no other key, even one for a new object at the same address.
    model = Scaling(1.0)
    key = _cache_key(model)
    assert key == _cache_key(model)
    del model
    gc.collect()
    assert key != _cache_key(Scaling(1.0))
    # layered models built from the same functions share one key (and compilations).
    assert (_cache_key(vgrad.models.layered(stem, block, head, DEPTH))
            == _cache_key(vgrad.models.layered(stem, block, head, DEPTH)))
    assert (_cache_key(vgrad.models.layered(stem, block, head, DEPTH))
            != _cache_key(vgrad.models.layered(stem, block, head, DEPTH + 1)))


# ---- linen, with BatchNorm -------------------------------------------------


class Layer(nn.Module):
    """Dense -> BatchNorm -> relu, vgrad's plain layer written as a user would."""

    features: int

    @nn.compact
    def __call__(self, h, train: bool = False):
        h = nn.Dense(self.features)(h)
        h = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(h)
        return nn.relu(h)


class Net(nn.Module):
    """A full linen model with a list of blocks (variables blocks_0 .. blocks_{L-1})."""

    depth: int

    def setup(self):
        self.stem = Layer(WIDTH)
        self.blocks = [Layer(WIDTH) for _ in range(self.depth)]
        self.head = nn.Dense(CLASSES)

    def __call__(self, x, train: bool = False):
        h = self.stem(x, train)
        for b in self.blocks:
            h = b(h, train)
        return self.head(h)

    def embed(self, x, train: bool):
        return self.stem(x, train)

    def block(self, h, i: int, train: bool):
        return self.blocks[i](h, train)


class Step(nn.Module):
    """A scanned model's step, (carry, x) -> (carry, y), with train as a field."""

    train: bool = False

    @nn.compact
    def __call__(self, h, _):
        return Layer(WIDTH, name="layer")(h, self.train), None


BN_CFG = ModelConfig(depth=DEPTH, width=WIDTH, num_classes=CLASSES, norm="batch",
                     activation="relu", bias_var=0.1)


@functools.lru_cache(maxsize=None)
def linen_case():
    """(vgrad's BN model, its variables, the linen Net's variables): one network."""
    own = vgrad.models.build(BN_CFG)
    own_vars = jax.jit(own.init)(jax.random.key(3), inputs())
    # Non-trivial running averages, so eval mode differs from train mode.
    own_vars = {**own_vars, "batch_stats": jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.uniform(jax.random.key(4), a.shape),
        own_vars["batch_stats"])}
    p, s = own_vars["params"], own_vars["batch_stats"]
    blocks = lambda tree: {f"blocks_{i}": jax.tree_util.tree_map(lambda a: a[i], tree)
                           for i in range(DEPTH)}
    net_vars = {"params": {"stem": p["stem"], **blocks(p["blocks"]["block"]["layer_0"]),
                           "head": p["head"]},
                "batch_stats": {"stem": s["stem"], **blocks(s["blocks"]["block"]["layer_0"])}}
    return own, own_vars, net_vars


@pytest.mark.parametrize("train", [True, False])
def test_linen_model_matches_jacfwd_and_vgrad_model(train):
    own, own_vars, net_vars = linen_case()
    x = inputs()
    net = Net(DEPTH)
    model = vgrad.models.from_linen(Layer(WIDTH), Layer(WIDTH), nn.Dense(CLASSES), DEPTH,
                                    activation="relu")
    variables = vgrad.models.linen_variables(net_vars, DEPTH)

    # The reference runs the full linen Net's own submodules (list layout).
    mutable = ["batch_stats"] if train else False
    run = lambda method, *args: net.apply(net_vars, *args, train=train, method=method,
                                          mutable=mutable)
    first = lambda out: out[0] if train else out
    h0 = first(run(Net.embed, x))
    maps = [lambda h, i=i: first(run(Net.block, h, i)) for i in range(DEPTH)]
    hs, jacs, prods = dense_chain(maps, h0)
    # (float32 round-off, amplified by batch statistics of 4 examples)
    np.testing.assert_allclose(model.hidden_states(variables, x, train=train), np.stack(hs),
                               rtol=1e-4, atol=1e-5)
    logits, new_stats = model.apply(variables, x, train=train)
    net_out = net.apply(net_vars, x, train=train, mutable=mutable)
    np.testing.assert_allclose(logits, first(net_out), rtol=1e-4, atol=1e-5)
    if train:  # updated running averages, in the adapter's stacked layout
        expected = vgrad.models.linen_variables({**net_vars, **net_out[1]}, DEPTH)["batch_stats"]
        jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                               new_stats, expected)

    report = jacobian_products(model, variables, x, train=train, key=jax.random.key(5),
                               num_probes=K)
    assert_products_match(report, jacs, prods)
    if not train:  # per example with running averages: no coupling through the batch
        assert np.abs(jacs[0][:WIDTH, WIDTH:]).max() == 0
        return  # (compilations saved: gradient_flow in eval mode is checked on the NNX model)
    assert np.abs(jacs[0][:WIDTH, WIDTH:]).max() > 1e-3  # train-mode BatchNorm couples examples
    assert_same_report(report, jacobian_products(own, own_vars, x, train=train,
                                                 key=jax.random.key(5), num_probes=K))
    batch = {"x": x, "y": Y}
    grads = gradient_flow(model, variables, batch, train=train)
    assert 0 < grads.dead_fraction.mean() < 1
    assert_same_report(grads, gradient_flow(own, own_vars, batch, train=train), rtol=1e-4)


def test_linen_scanned_model_and_errors():
    _, _, net_vars = linen_case()
    x = inputs()
    variables = vgrad.models.linen_variables(net_vars, DEPTH)
    # The scanned layout: variables {"blocks": {"layer": stacked}}; its step
    # module, (carry, x) -> (carry, y) with a train field, is the block.
    scanned_vars = {col: {"stem": tree["stem"], "blocks": {"layer": tree["blocks"]},
                          **({"head": tree["head"]} if tree["head"] else {})}
                    for col, tree in variables.items()}
    scan_net = nn.scan(Step, variable_axes={"params": 0, "batch_stats": 0},
                       split_rngs={"params": True}, length=DEPTH)
    model = vgrad.models.from_linen(Layer(WIDTH), Step(), nn.Dense(CLASSES), DEPTH)
    converted = vgrad.models.linen_variables(scanned_vars, DEPTH)
    logits, _ = model.apply(converted, x, train=False)
    h0 = Layer(WIDTH).apply({"params": scanned_vars["params"]["stem"],
                             "batch_stats": scanned_vars["batch_stats"]["stem"]}, x)
    hL, _ = scan_net(train=False).apply({"params": scanned_vars["params"]["blocks"],
                                         "batch_stats": scanned_vars["batch_stats"]["blocks"]},
                                        h0, None)
    np.testing.assert_allclose(logits, nn.Dense(CLASSES).apply(
        {"params": scanned_vars["params"]["head"]}, hL), rtol=1e-5, atol=1e-6)
    # The analysis sees only hidden_states and block_fn: both equal the list model's.
    listed = vgrad.models.from_linen(Layer(WIDTH), Layer(WIDTH), nn.Dense(CLASSES), DEPTH)
    hs = model.hidden_states(converted, x, train=True)
    np.testing.assert_allclose(hs, listed.hidden_states(variables, x, train=True), rtol=1e-6)
    np.testing.assert_allclose(model.block_fn(converted, 2, train=True)(hs[1]),
                               listed.block_fn(variables, 2, train=True)(hs[1]), rtol=1e-6)

    params = net_vars["params"]
    with pytest.raises(ValueError, match="neither 'layers'"):
        vgrad.models.linen_variables(net_vars, DEPTH, blocks="layers")
    with pytest.raises(ValueError, match="belong to none of"):
        vgrad.models.linen_variables({"params": {**params, "final_norm": {"scale": 1.0}}}, DEPTH)
    with pytest.raises(ValueError, match="blocks_1 differs from blocks_0"):
        vgrad.models.linen_variables({"params": {**params, "blocks_1": {"Dense_0": {}}}}, DEPTH)
    wide = vgrad.models.from_linen(Layer(WIDTH), Layer(2 * WIDTH), nn.Dense(CLASSES), DEPTH)
    with pytest.raises(ValueError, match="shape-preserving"):
        wide.init(jax.random.key(0), x)


# ---- NNX, with BatchNorm ---------------------------------------------------


class NnxBlock(nnx.Module):
    def __init__(self, din: int, dout: int, rngs: nnx.Rngs):
        self.linear = nnx.Linear(din, dout, rngs=rngs)
        self.bn = nnx.BatchNorm(dout, momentum=0.9, epsilon=1e-5, rngs=rngs)

    def __call__(self, h):
        return jnp.tanh(self.bn(self.linear(h)))


class NnxNet(nnx.Module):
    def __init__(self, depth: int, rngs: nnx.Rngs, widths=None):
        widths = widths or [WIDTH] * (depth + 1)
        self.stem = nnx.Linear(IN, WIDTH, rngs=rngs)
        self.blocks = nnx.List([NnxBlock(widths[i], widths[i + 1], rngs) for i in range(depth)])
        self.head = nnx.Linear(WIDTH, CLASSES, rngs=rngs)

    def __call__(self, x):
        h = self.stem(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def nnx_net() -> NnxNet:
    net = NnxNet(DEPTH, nnx.Rngs(0))
    for i, b in enumerate(net.blocks):  # non-trivial running averages and BN parameters
        key = jax.random.key(10 + i)
        b.bn.mean[...] = 0.3 * jax.random.normal(key, (WIDTH,))
        b.bn.var[...] = 0.5 + jax.random.uniform(key, (WIDTH,))
        b.bn.scale[...] = 1.0 + 0.2 * jax.random.normal(jax.random.fold_in(key, 1), (WIDTH,))
    return net


def nnx_reference(net: NnxNet, train: bool):
    """The NNX network in plain jnp, parameters read from its attributes:
    (params pytree, stem, block_maps(params), head(params))."""
    params = {"stem": (net.stem.kernel[...], net.stem.bias[...]),
              "blocks": [(b.linear.kernel[...], b.linear.bias[...], b.bn.scale[...],
                          b.bn.bias[...]) for b in net.blocks],
              "head": (net.head.kernel[...], net.head.bias[...])}
    running = [(b.bn.mean[...], b.bn.var[...]) for b in net.blocks]

    def block_map(p, i):
        kernel, bias, scale, offset = p["blocks"][i]

        def f(h):
            z = h @ kernel + bias
            mean, var = (z.mean(0), z.var(0)) if train else running[i]
            return jnp.tanh((z - mean) / jnp.sqrt(var + 1e-5) * scale + offset)
        return f

    stem_map = lambda p, x: x @ p["stem"][0] + p["stem"][1]
    head_map = lambda p: lambda h: h @ p["head"][0] + p["head"][1]
    return params, stem_map, lambda p: [block_map(p, i) for i in range(DEPTH)], head_map


@pytest.mark.parametrize("train", [True, False])
def test_nnx_model_matches_jacfwd_and_autodiff(train):
    net = nnx_net()
    x = inputs()
    model, variables = vgrad.models.from_nnx(net, activation="tanh")
    assert jax.tree_util.tree_map(jnp.shape, variables["batch_stats"]["blocks"]) == {
        "bn": {"mean": (DEPTH, WIDTH), "var": (DEPTH, WIDTH)}}
    assert not net.blocks[0].bn.use_running_average  # the user's module is not modified

    params, stem_map, block_maps, head_map = nnx_reference(net, train)
    hs, jacs, prods = dense_chain(block_maps(params), stem_map(params, x))
    np.testing.assert_allclose(model.hidden_states(variables, x, train=train), np.stack(hs),
                               rtol=1e-5, atol=1e-6)
    report = jacobian_products(model, variables, x, train=train, key=jax.random.key(6),
                               num_probes=K)
    assert_products_match(report, jacs, prods)

    grads = gradient_flow(model, variables, {"x": x, "y": Y}, train=train)

    def loss(p):
        h = stem_map(p, x)
        for f in block_maps(p):
            h = f(h)
        return cross_entropy(head_map(p)(h))

    value, g = jax.jit(jax.value_and_grad(loss))(params)
    assert grads.loss == pytest.approx(float(value), rel=1e-5)
    np.testing.assert_allclose(grads.weight_grad_norms, [norm(gb) for gb in g["blocks"]],
                               rtol=1e-4)
    assert grads.stem_grad_norm == pytest.approx(norm(g["stem"]), rel=1e-4)
    assert grads.head_grad_norm == pytest.approx(norm(g["head"]), rel=1e-4)
    np.testing.assert_allclose(grads.hidden_grad_norms,
                               hidden_grad_norms(block_maps(params), head_map(params), hs[0]),
                               rtol=1e-4)
    np.testing.assert_allclose(grads.saturated_fraction[1:],
                               [(1 - np.asarray(h) ** 2 < 0.05).mean() for h in hs[1:]],
                               atol=1e-7)


def test_nnx_train_mode_statistics_eval_logits_and_errors():
    net = nnx_net()
    x = inputs()
    model, variables = vgrad.models.from_nnx(net)
    # Eval mode: the network's own output with running averages.
    clone = nnx.clone(net)
    clone.eval()
    logits, stats = model.apply(variables, x, train=False)
    np.testing.assert_allclose(logits, clone(x), rtol=1e-5, atol=1e-6)
    assert stats is variables["batch_stats"]
    # Train mode: the running averages nnx.BatchNorm itself computes, stacked.
    clone.train()
    expected_logits = clone(x)
    logits, stats = model.apply(variables, x, train=True)
    np.testing.assert_allclose(logits, expected_logits, rtol=1e-5, atol=1e-6)
    for i, b in enumerate(clone.blocks):
        np.testing.assert_allclose(stats["blocks"]["bn"]["mean"][i], b.bn.mean[...], rtol=1e-5)
        np.testing.assert_allclose(stats["blocks"]["bn"]["var"][i], b.bn.var[...], rtol=1e-5)

    with pytest.raises(ValueError, match=r"blocks\[1\] differs from blocks\[0\]"):
        vgrad.models.from_nnx(NnxNet(DEPTH, nnx.Rngs(0), widths=[WIDTH, WIDTH, 4, WIDTH]))
    with pytest.raises(ValueError, match="no attribute 'layers'"):
        vgrad.models.from_nnx(net, blocks="layers")
    with pytest.raises(ValueError, match="carries its own variables"):
        model.init(jax.random.key(0), x)
