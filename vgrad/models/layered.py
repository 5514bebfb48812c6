"""Your own model: the protocol the analysis needs, and ``layered`` to build it
from three pure functions.

The protocol is ``AnalysisModel`` (also ``vgrad.models.AnalysisModel``),
whose docstring lists every attribute and method an object needs.

``vgrad.models.layered(stem, block, head, depth)`` builds such an object from
pure functions, and ``vgrad.models.from_linen`` / ``from_nnx`` from Flax
modules. (The package attribute ``vgrad.models.layered`` is that function;
import this module's other names with ``from vgrad.models.layered import ...``.)
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

Variables = dict[str, Any]

# Attributes every analysis function calls, and the ones gradient_flow adds.
REQUIRED_ATTRIBUTES = ("depth", "hidden_states", "block_fn")
GRADIENT_FLOW_ATTRIBUTES = ("apply", "head_fn")


@runtime_checkable
class AnalysisModel(Protocol):
    """The analysis protocol: what ``vgrad.analysis`` needs from a model.

    ``vgrad.analysis`` never reads a ``ModelConfig``; it needs an object with:

    Required by every analysis function (``jacobian_products``,
    ``jacobian_spectrum``, ``dense_jacobian``, ``top_singular_values``,
    ``gradient_flow``):

    - ``depth: int`` -- the number of blocks L.
    - ``hidden_states(variables, x, *, train) -> array (L+1, *h)`` -- h^0 (the
      stem output) .. h^L (the last block output), stacked. ``h`` is the shape of
      one hidden state of the whole batch, e.g. (B, width).
    - ``block_fn(variables, l, *, train) -> f`` -- the pure map f: h^{l-1} -> h^l
      of block l, 1-based (1 <= l <= L); ``l`` may be a traced int32 scalar, so
      the block must select its variables with array indexing, not Python control
      flow. f maps the whole batch, an array of shape h to an array of shape h
      (blocks are shape-preserving), so Jacobians include any coupling of the
      examples (BatchNorm in train mode).

    Required by ``gradient_flow`` only:

    - ``apply(variables, x, *, train, identity_blocks=None) -> (logits (B, C),
      new_batch_stats)`` -- the full model. ``identity_blocks`` is None or a bool
      array (L,) (possibly traced): those blocks keep their forward value but get
      the identity as input-Jacobian in the backward pass
      (y = f(sg(h)) + h - sg(h)), for attribution.
    - ``head_fn(variables, *, train) -> g`` -- g: h^L -> logits (B, C), the head
      (with any pooling) of the same model, so that dLoss/dh^L is the real one.
      (vgrad's own ``LayeredModel`` has none; the analysis reads its head another way.)
    - ``variables["params"]`` is ``{"stem": ..., "blocks": ..., "head": ...}`` with
      every leaf of ``"blocks"`` stacked along a leading axis of length L, so the
      weight gradient of block l is slice l-1 of the ``"blocks"`` gradient.

    Optional attributes (``getattr`` with a default):

    - ``activation: str | None`` (None) -- the activation name (as in
      ``ModelConfig.activation``) whose outputs the hidden states are (e.g. "tanh"
      for h^l = tanh(W h^{l-1} + b)); ``gradient_flow`` then reports saturated or
      dead fractions of h^l. vgrad's own models use their config's activation and
      the activations inside each block.
    - ``cache_key: Hashable`` -- models with equal keys compute the same functions
      of (variables, x), so their jitted analysis functions are shared. Without
      one, caches are keyed on the object itself (held by a weak reference, so a
      new object that reuses a dead one's ``id`` never hits its entries).
    - ``supports_identity_sublayers: bool`` (False) -- whether ``gradient_flow``'s
      ``identity_sublayers`` attribution applies; only vgrad's own models have
      sub-layers the analysis can see.

    ``isinstance(model, AnalysisModel)`` checks the three required members only.
    """

    depth: int

    def hidden_states(self, variables: Variables, x: jax.Array, *, train: bool) -> jax.Array: ...

    def block_fn(self, variables: Variables, l: int | jax.Array, *,
                 train: bool) -> Callable[[jax.Array], jax.Array]: ...


PROTOCOL_SUMMARY = (
    "depth (int), hidden_states(variables, x, *, train) -> (L+1, *h), "
    "block_fn(variables, l, *, train) -> (h^{l-1} -> h^l, shape-preserving, l 1-based)")


def check_protocol(model: Any, extra: Sequence[str] = ()) -> None:
    """TypeError naming what ``model`` lacks of the analysis protocol (and of ``extra``)."""
    missing = [name for name in (*REQUIRED_ATTRIBUTES, *extra) if not hasattr(model, name)]
    if missing:
        raise TypeError(
            f"{type(model).__name__} does not implement the analysis protocol: missing "
            f"{', '.join(missing)}. It needs {PROTOCOL_SUMMARY}"
            + (f", plus {', '.join(extra)}" if extra else "")
            + ". Build one with vgrad.models.layered(stem, block, head, depth), "
            "vgrad.models.from_linen or vgrad.models.from_nnx (see vgrad.models.AnalysisModel).")


def identity_mask(depth: int, identity_blocks: Sequence[int] | jax.Array | None) -> jax.Array:
    """Block indices (1-based) or a bool mask (L,) -> bool mask (L,); ValueError if out of range."""
    if identity_blocks is None:
        return jnp.zeros((depth,), bool)
    arr = jnp.asarray(identity_blocks)
    if arr.dtype == jnp.bool_:
        if arr.shape != (depth,):
            raise ValueError(f"identity_blocks mask must have shape ({depth},), got {arr.shape}")
        return arr
    blocks = [int(b) for b in identity_blocks]
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad:
        raise ValueError(f"invalid identity_blocks={bad}: block indices run from 1 to {depth}")
    return jnp.zeros((depth,), bool).at[jnp.asarray(blocks, int) - 1].set(True)


def check_block_index(l: Any, depth: int) -> None:
    """ValueError unless ``l`` is a block index 1..depth; a traced index (inside
    jit/scan) cannot be checked and is let through (array indexing would wrap
    l = 0 to block L and clamp l > L)."""
    if isinstance(l, jax.core.Tracer):
        return
    try:
        value = None if isinstance(l, bool) or jnp.ndim(l) != 0 else operator.index(l)
    except TypeError:
        value = None
    if value is None:
        raise ValueError(f"invalid block index l={l!r}: must be an integer in [1, {depth}] "
                         "(blocks are 1-based: block l maps h^(l-1) -> h^l)")
    if not 1 <= value <= depth:
        raise ValueError(f"invalid block index l={value}: blocks run from 1 to {depth}")


class FunctionModel:
    """A stem -> L blocks -> head model made of pure functions; see ``layered``.

    Variables: ``{"params": {"stem", "blocks", "head"}, "batch_stats": {"stem",
    "blocks", "head"}}``; every leaf under ``"blocks"`` is stacked along a
    leading axis of length L (slice l-1 belongs to block l). ``batch_stats``
    may be missing or ``{}`` for a model without batch statistics.
    """

    supports_identity_sublayers = False

    def __init__(self, stem: Callable, block: Callable, head: Callable, depth: int, *,
                 batch_coupled: bool = False, init_stem: Callable | None = None,
                 init_block: Callable | None = None, init_head: Callable | None = None,
                 activation: str | None = None, cache_key: Hashable | None = None,
                 init_hint: str | None = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"invalid depth={depth!r}: must be an integer >= 1")
        for name, fn in (("stem", stem), ("block", block), ("head", head)):
            if not callable(fn):
                raise TypeError(f"{name} must be a function, got {type(fn).__name__}")
        self._stem_f, self._block_f, self._head_f = stem, block, head
        self._depth = depth
        self.batch_coupled = bool(batch_coupled)
        self._inits = {"init_stem": init_stem, "init_block": init_block, "init_head": init_head}
        self.activation = activation
        self._init_hint = init_hint
        # Equal keys promise equal functions of (variables, x): the functions
        # themselves (hashed by identity), the depth and what changes the
        # compiled analysis (coupling, activation). Initialisers do not.
        self.cache_key = (("layered", stem, block, head, depth, self.batch_coupled, activation)
                          if cache_key is None else cache_key)

    @property
    def depth(self) -> int:
        return self._depth

    @property
    def has_batch_stats(self) -> bool:
        return self.batch_coupled

    def __repr__(self) -> str:
        name = lambda f: getattr(f, "__qualname__", type(f).__name__)
        return (f"FunctionModel(stem={name(self._stem_f)}, block={name(self._block_f)}, "
                f"head={name(self._head_f)}, depth={self._depth}, "
                f"batch_coupled={self.batch_coupled})")

    # ---- calling the user's functions ------------------------------------

    def _call(self, what: str, fn: Callable, params: Any, x: jax.Array, train: bool,
              stats: Any, *extra) -> tuple[jax.Array, Any]:
        """(output, new batch statistics) of one of the user's functions."""
        if not self.batch_coupled:
            return fn(params, x, *extra), stats
        out = fn(params, x, *extra, train=train, batch_stats=stats)
        if not (isinstance(out, tuple) and len(out) == 2):
            raise ValueError(f"with batch_coupled=True, {what} must return a pair (output, "
                             f"new batch_stats), got {type(out).__name__}")
        return out

    def _stem(self, variables: Variables, x: jax.Array, train: bool):
        return self._call("stem", self._stem_f, variables["params"]["stem"], x, train,
                          _stats(variables, "stem"))

    def _block(self, params_l: Any, h: jax.Array, l: jax.Array, train: bool, stats_l: Any):
        return self._call("block", self._block_f, params_l, h, train, stats_l, l)

    def _head(self, variables: Variables, h: jax.Array, train: bool):
        return self._call("head", self._head_f, variables["params"]["head"], h, train,
                          _stats(variables, "head"))

    def _check_blocks(self, variables: Variables, h0: jax.Array, train: bool) -> None:
        """Trace-time checks with messages that say what the protocol needs
        (otherwise lax.scan fails with a message about carry types)."""
        L = self._depth
        stacked = {"params": variables["params"]["blocks"],
                   "batch_stats": _stats(variables, "blocks")}
        for col, tree in stacked.items():
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
                if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != L:
                    raise ValueError(
                        f"variables[{col!r}]['blocks']{jax.tree_util.keystr(path)} has shape "
                        f"{jnp.shape(leaf)}: every leaf of the blocks' variables must be stacked "
                        f"along a leading axis of length depth={L} (slice l-1 is block l)")
        first = jax.tree_util.tree_map(lambda a: a[0], stacked)
        out, new_stats = jax.eval_shape(
            lambda v, h: self._block(v["params"], h, jnp.int32(1), train, v["batch_stats"]),
            first, h0)
        if not hasattr(out, "shape") or (out.shape, out.dtype) != (h0.shape, h0.dtype):
            got = f"{out.shape} ({out.dtype})" if hasattr(out, "shape") else type(out).__name__
            raise ValueError(
                f"block 1 maps h^0 of shape {h0.shape} ({h0.dtype}) to {got}: the analysis "
                "protocol needs shape-preserving blocks h^l = f_l(h^{l-1}), one shape and dtype "
                "for h^0 .. h^L; put a change of width into the stem or the head")
        if self.batch_coupled and (jax.tree_util.tree_structure(new_stats)
                                   != jax.tree_util.tree_structure(first["batch_stats"])):
            raise ValueError("block must return new batch_stats with the structure of its "
                             "batch_stats argument (its slice of the stacked statistics)")

    def _forward(self, variables: Variables, x: jax.Array, train: bool,
                 mask: jax.Array | None, collect: bool):
        h0, stem_stats = self._stem(variables, x, train)
        self._check_blocks(variables, h0, train)
        ls = jnp.arange(1, self._depth + 1, dtype=jnp.int32)

        def step(h, xs):
            params_l, stats_l, l, flag = xs
            if mask is None:
                out, new_stats = self._block(params_l, h, l, train, stats_l)
            else:
                # Flagged blocks see a constant input and add the straight-through
                # term: forward value f(h), input-Jacobian I (one evaluation).
                h_const = jax.lax.stop_gradient(h)
                out, new_stats = self._block(params_l, jnp.where(flag, h_const, h), l, train,
                                             stats_l)
                out = out + jnp.where(flag, h - h_const, 0)
            return out, (new_stats, out if collect else None)

        flags = jnp.zeros((self._depth,), bool) if mask is None else mask
        h_last, (block_stats, hidden) = jax.lax.scan(
            step, h0, (variables["params"]["blocks"], _stats(variables, "blocks"), ls, flags))
        return h0, h_last, hidden, stem_stats, block_stats

    # ---- the functional face (same as vgrad.models.build(cfg)) -----------

    def init(self, key: jax.Array, x: jax.Array) -> Variables:
        """Initial variables for inputs shaped like ``x`` (B, ...) from the
        initialisers given to ``layered``; block initialisers are vmapped over L keys."""
        missing = [name for name, fn in self._inits.items() if fn is None]
        if missing:
            raise ValueError(self._init_hint or (
                f"init needs {', '.join(missing)} (give them to vgrad.models.layered), or build "
                "the variables yourself: {'params': {'stem': ..., 'blocks': <leaves stacked "
                "along a leading axis of length depth>, 'head': ...}, 'batch_stats': {...}}"))
        k_stem, k_blocks, k_head = jax.random.split(key, 3)

        def split_init(name, *args):
            out = self._inits[name](*args)
            if self.batch_coupled:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise ValueError(f"with batch_coupled=True, {name} must return "
                                     f"(params, batch_stats), got {type(out).__name__}")
                return out
            return out, {}

        stem_p, stem_s = split_init("init_stem", k_stem, x)
        h0, _ = self._call("stem", self._stem_f, stem_p, x, False, stem_s)
        keys = jax.random.split(k_blocks, self._depth)
        blocks_p, blocks_s = jax.vmap(lambda k: split_init("init_block", k, h0))(keys)
        self._check_blocks({"params": {"blocks": blocks_p}, "batch_stats": {"blocks": blocks_s}},
                           h0, False)
        # Blocks are shape-preserving, so h^0 has the shape of h^L.
        head_p, head_s = split_init("init_head", k_head, h0)
        return {"params": {"stem": stem_p, "blocks": blocks_p, "head": head_p},
                "batch_stats": ({"stem": stem_s, "blocks": blocks_s, "head": head_s}
                                if self.batch_coupled else {})}

    def apply(self, variables: Variables, x: jax.Array, *, train: bool,
              identity_blocks: Sequence[int] | jax.Array | None = None) -> tuple[jax.Array, Any]:
        """Logits (B, C) and the new batch statistics. Pure.

        With ``batch_coupled`` and ``train=True`` the functions' new statistics
        are returned (stacked for the blocks); otherwise ``variables["batch_stats"]``
        unchanged. ``identity_blocks`` (1-based indices or a bool mask (L,)) gives
        those blocks an identity input-Jacobian in the backward pass.
        """
        mask = None if identity_blocks is None else identity_mask(self._depth, identity_blocks)
        _, h_last, _, stem_stats, block_stats = self._forward(variables, x, train, mask, False)
        logits, head_stats = self._head(variables, h_last, train)
        if not (self.batch_coupled and train):
            return logits, variables.get("batch_stats", {})
        return logits, {"stem": stem_stats, "blocks": block_stats, "head": head_stats}

    def hidden_states(self, variables: Variables, x: jax.Array, *, train: bool) -> jax.Array:
        """All hidden states stacked, shape (L+1, *h): index l is h^l."""
        h0, _, hidden, _, _ = self._forward(variables, x, train, None, True)
        return jnp.concatenate([h0[None], hidden], axis=0)

    def block_variables(self, variables: Variables, l: int | jax.Array) -> Variables:
        """Variables of block l (1-based; may be a traced integer)."""
        check_block_index(l, self._depth)
        take = lambda tree: jax.tree_util.tree_map(lambda a: a[l - 1], tree)
        return {"params": take(variables["params"]["blocks"]),
                "batch_stats": take(_stats(variables, "blocks"))}

    def block_fn(self, variables: Variables, l: int | jax.Array, *,
                 train: bool) -> Callable[[jax.Array], jax.Array]:
        """The pure map h^{l-1} -> h^l of block l (1-based, may be traced), over a whole batch."""
        block_vars = self.block_variables(variables, l)
        index = jnp.asarray(l, jnp.int32)

        def f(h: jax.Array) -> jax.Array:
            return self._block(block_vars["params"], h, index, train, block_vars["batch_stats"])[0]

        return f

    def head_fn(self, variables: Variables, *, train: bool) -> Callable[[jax.Array], jax.Array]:
        """The pure map h^L -> logits (B, C)."""
        return lambda h: self._head(variables, h, train)[0]


def _stats(variables: Variables, part: str) -> Any:
    """Batch statistics of one part ({} when the model has none)."""
    stats = variables.get("batch_stats") or {}
    return stats.get(part, {})


def layered(stem: Callable, block: Callable, head: Callable, depth: int, *,
            batch_coupled: bool = False, init_stem: Callable | None = None,
            init_block: Callable | None = None, init_head: Callable | None = None,
            activation: str | None = None, cache_key: Hashable | None = None) -> FunctionModel:
    """A model stem -> L blocks -> head from pure functions, analysable like vgrad's own.

    Without batch coupling (default):
      ``stem(params, x) -> h0``: x (B, ...) -> h0 with hidden shape h, e.g. (B, width).
      ``block(params_l, h, l) -> h``: shape-preserving; ``params_l`` is slice
        l-1 of the stacked block parameters and ``l`` the 1-based block index,
        a scalar int32 array that may be traced (use it in array arithmetic only).
      ``head(params, h) -> logits`` (B, C), with any pooling.
      Each is called on the whole batch; the examples must not interact.

    ``batch_coupled=True`` (BatchNorm or anything mixing the examples of a
    batch, or any other state updated in training): each function also takes
    the keyword arguments ``train`` (a Python bool: True = batch statistics,
    False = running averages) and ``batch_stats`` (its part of
    ``variables["batch_stats"]``: for the block, slice l-1 of the stacked
    statistics) and returns ``(output, new_batch_stats)``:
      ``stem(params, x, *, train, batch_stats) -> (h0, stats)``,
      ``block(params_l, h, l, *, train, batch_stats) -> (h, stats_l)``,
      ``head(params, h, *, train, batch_stats) -> (logits, stats)``.
    ``apply(..., train=True)`` returns the new statistics in the same layout;
    the analysis differentiates the whole-batch maps.

    Variables: ``{"params": {"stem", "blocks", "head"}, "batch_stats": {"stem",
    "blocks", "head"}}`` (batch_stats ``{}`` without coupling); every leaf under
    ``"blocks"`` has a leading axis of length ``depth``.

    Optional:
      init_stem(key, x) -> params, init_block(key, h) -> params_l,
        init_head(key, h) -> params (each ``-> (params, batch_stats)`` when
        batch_coupled): used by ``model.init(key, x)``; ``init_block`` is
        vmapped over ``depth`` keys to stack the block parameters.
      activation: name of the activation whose outputs the hidden states are
        (e.g. "tanh"), for saturation / dead-unit statistics in gradient_flow.
      cache_key: hashable; defaults to the functions (by identity), depth,
        batch_coupled and activation, so rebuilding the model from the same
        functions reuses compiled analysis functions.

    Returns a ``FunctionModel`` with ``init``, ``apply``, ``hidden_states``,
    ``block_fn``, ``head_fn`` and ``depth``: the analysis protocol (``AnalysisModel``).
    """
    return FunctionModel(stem, block, head, depth, batch_coupled=batch_coupled,
                         init_stem=init_stem, init_block=init_block, init_head=init_head,
                         activation=activation, cache_key=cache_key)


__all__ = ["AnalysisModel", "FunctionModel", "GRADIENT_FLOW_ATTRIBUTES", "PROTOCOL_SUMMARY",
           "REQUIRED_ATTRIBUTES", "check_block_index", "check_protocol", "identity_mask",
           "layered"]
