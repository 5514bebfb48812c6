"""Adapters: Flax linen and NNX networks as analysable ``FunctionModel``s.

Both adapters see a network as stem -> L blocks -> head, where the L blocks
are one submodule definition applied L times (each with its own variables),
and build ``vgrad.models.layered(..., batch_coupled=True)`` from it, so the
analysis protocol (``vgrad.models.AnalysisModel``) holds: variables are
``{"params": {"stem", "blocks", "head"}, "batch_stats": {"stem", "blocks",
"head"}}`` with the blocks' leaves stacked along a leading axis of length L.

linen::

    model = from_linen(stem=nn.Dense(64), block=MyBlock(64), head=nn.Dense(10), depth=20)
    variables = model.init(key, x)
    # or, from a full model with "stem", "blocks_0".."blocks_19" (or scanned "blocks"), "head":
    variables = linen_variables(net_variables, depth=20)

NNX::

    # net.stem, net.blocks (nnx.List / list / nnx.Sequential), net.head:
    model, variables = from_nnx(net)

Train/eval mode: a linen module gets ``train=`` when its ``__call__`` takes a
``train`` argument, or is cloned with ``train=`` when it has a ``train``
field; BatchNorm should use ``use_running_average=not train``. An NNX module
is viewed with ``use_running_average=not train`` and ``deterministic=True``
(``nnx.view``; the user's module is not modified), so ``nnx.BatchNorm`` uses
batch statistics in train mode and running averages in eval mode, and dropout
is off in both (the analysis measures one deterministic map).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx

from vgrad.models.layered import FunctionModel, layered

_PROTOCOL_NEEDS = ("the analysis protocol needs stem -> L blocks -> head, with the L blocks one "
                   "shape-preserving submodule definition applied L times (each with its own "
                   "variables) and nothing between them")

# --------------------------------------------------------------------------
# linen
# --------------------------------------------------------------------------


class _LinenPart:
    """Calls one linen module as ``(variables, x, train) -> (y, new_batch_stats)``."""

    def __init__(self, what: str, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"{what} must be a flax.linen Module, got {type(module).__name__}")
        self.what, self.module = what, module
        params = inspect.signature(type(module).__call__).parameters
        self.takes_train = "train" in params
        self.train_field = "train" in {f.name for f in dataclasses.fields(module)}
        # An nn.scan step, __call__(self, carry, x) -> (carry, y): called as
        # (h, None) and its carry is h^l, so a scanned model's own block works.
        positional = [p for name, p in list(params.items())[1:]
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
                      and p.default is p.empty and name != "train"]
        self.scan_step = len(positional) >= 2

    def _module(self, train: bool) -> tuple[nn.Module, dict]:
        module = self.module.clone(train=train) if self.train_field else self.module
        return module, ({"train": train} if self.takes_train else {})

    def _args(self, x: jax.Array) -> tuple:
        return (x, None) if self.scan_step else (x,)

    def _output(self, out: Any) -> jax.Array:
        return out[0] if self.scan_step else out

    def init(self, key: jax.Array, x: jax.Array) -> tuple[Any, Any]:
        module, kwargs = self._module(False)
        variables = module.init(key, *self._args(x), **kwargs)
        other = sorted(set(variables) - {"params", "batch_stats"})
        if other:
            raise ValueError(f"{self.what} module has variable collections {other}: the linen "
                             "adapter supports 'params' and 'batch_stats' only")
        return variables.get("params", {}), variables.get("batch_stats", {})

    def __call__(self, params: Any, x: jax.Array, *extra, train: bool, batch_stats: Any):
        # extra: the block index l, which a linen block does not take (its
        # variables are already those of block l).
        module, kwargs = self._module(train)
        variables = {"params": params}
        if batch_stats:
            variables["batch_stats"] = batch_stats
        if train and batch_stats:
            out, updates = module.apply(variables, *self._args(x), mutable=["batch_stats"],
                                        **kwargs)
            return self._output(out), updates["batch_stats"]
        return self._output(module.apply(variables, *self._args(x), **kwargs)), batch_stats


def from_linen(stem: nn.Module, block: nn.Module, head: nn.Module, depth: int, *,
               activation: str | None = None) -> FunctionModel:
    """The linen network stem -> block x depth -> head as an analysable model.

    Args:
      stem: module x (B, ...) -> h0 (B, ...).
      block: the one module definition applied at every block, h -> h of the
        same shape (each block has its own variables, stacked along a leading
        axis of length ``depth``). An ``nn.scan`` step module
        ``__call__(self, carry, x) -> (carry, y)`` is accepted too (called as
        ``(h, None)``; its carry is h^l).
      head: module h^L -> logits (B, C), with any pooling.
      depth: L.
      activation: optional activation name of the hidden states, for
        gradient_flow's saturation / dead statistics.

    Modules may hold 'params' and 'batch_stats' (BatchNorm); the train flag
    reaches them as a ``train`` call argument or a ``train`` field (module
    docstring). ``model.init(key, x)`` initialises every part with linen's
    ``init`` (blocks vmapped over ``depth`` keys); ``linen_variables``
    converts the variables of a full linen model. A block that is not
    shape-preserving raises ValueError when the model is first run.
    """
    parts = [_LinenPart("stem", stem), _LinenPart("block", block), _LinenPart("head", head)]
    stem_p, block_p, head_p = parts
    return layered(stem_p, block_p, head_p, depth, batch_coupled=True,
                   init_stem=stem_p.init, init_block=block_p.init, init_head=head_p.init,
                   activation=activation,
                   # linen modules are frozen dataclasses, equal and hashed by their
                   # fields: the same modules share compiled analysis functions.
                   cache_key=("linen", stem, block, head, depth, activation))


def _lookup(tree: dict, path: str) -> Any:
    for name in path.split("/"):
        if not isinstance(tree, dict) or name not in tree:
            raise KeyError(name)
        tree = tree[name]
    return tree


def _pop(tree: dict, path: str) -> dict:
    """``tree`` without the entry at ``path`` (a shallow-copied spine)."""
    head, _, rest = path.partition("/")
    tree = dict(tree)
    if rest:
        tree[head] = _pop(tree[head], rest)
        if not tree[head]:
            del tree[head]
    else:
        tree.pop(head)
    return tree


def _stack_blocks(collection: dict, blocks: str, depth: int, col_name: str) -> tuple[Any, dict]:
    """(stacked block variables, the collection without them) of one collection."""
    scanned_ok = True
    try:
        stacked = _lookup(collection, blocks)
    except KeyError:
        scanned_ok = False
    if scanned_ok:
        for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
            if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != depth:
                raise ValueError(
                    f"variables[{col_name!r}][{blocks!r}]{jax.tree_util.keystr(path)} has shape "
                    f"{jnp.shape(leaf)}, not stacked along a leading axis of length depth={depth}; "
                    + _PROTOCOL_NEEDS)
        return stacked, _pop(collection, blocks)
    names = [f"{blocks}_{i}" for i in range(depth)]
    found = []
    for name in names:
        try:
            found.append(_lookup(collection, name))
        except KeyError:
            break
    if len(found) != depth:
        raise ValueError(
            f"variables[{col_name!r}] has neither {blocks!r} (the blocks scanned, stacked along a "
            f"leading axis of length {depth}) nor {blocks!r}_0 .. {blocks!r}_{depth - 1} (a list "
            f"of blocks; found {len(found)}); top-level names: {sorted(collection)}. "
            + _PROTOCOL_NEEDS)
    try:
        _lookup(collection, f"{blocks}_{depth}")
        raise ValueError(f"variables[{col_name!r}] has {blocks}_{depth}: more than depth={depth} "
                         "blocks")
    except KeyError:
        pass
    ref = jax.tree_util.tree_map(jnp.shape, found[0])
    for i, tree in enumerate(found[1:], start=1):
        if jax.tree_util.tree_map(jnp.shape, tree) != ref:
            raise ValueError(
                f"variables[{col_name!r}]: {blocks}_{i} differs from {blocks}_0 in structure or "
                f"shapes ({jax.tree_util.tree_map(jnp.shape, tree)} vs {ref}); " + _PROTOCOL_NEEDS)
    stacked = jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *found)
    rest = collection
    for name in names:
        rest = _pop(rest, name)
    return stacked, rest


def linen_variables(variables: dict, depth: int, *, stem: str = "stem", blocks: str = "blocks",
                    head: str = "head") -> dict:
    """Variables of a full linen model in the layout of ``from_linen``'s model.

    ``stem`` / ``head`` name the submodules of the stem and the head;
    ``blocks`` the blocks: either one scanned submodule (``nn.scan``, leaves
    stacked along a leading axis of length ``depth``) or a list of submodules
    named ``{blocks}_0`` .. ``{blocks}_{depth-1}`` (Flax's names for a list
    attribute set in ``setup``). Names may be paths ("blocks/block"). Any other
    top-level variables raise ValueError: the protocol has nothing between
    stem, blocks and head. Returns ``{"params": {"stem", "blocks", "head"},
    "batch_stats": {...}}`` (stems or heads without variables get ``{}``).
    """
    other = sorted(set(variables) - {"params", "batch_stats"})
    if other:
        raise ValueError(f"variables have collections {other}: the linen adapter supports "
                         "'params' and 'batch_stats' only")
    out = {}
    for col in ("params", "batch_stats"):
        collection = dict(variables.get(col, {}))
        if not collection:
            out[col] = {}
            continue
        stacked, rest = _stack_blocks(collection, blocks, depth, col)
        parts = {"blocks": stacked}
        for part, name in (("stem", stem), ("head", head)):
            try:
                parts[part] = _lookup(rest, name)
                rest = _pop(rest, name)
            except KeyError:
                if col == "params" and part == "head":
                    raise ValueError(f"variables['params'] has no head {name!r}; top-level "
                                     f"names: {sorted(collection)}") from None
                parts[part] = {}
        if rest:
            raise ValueError(f"variables[{col!r}] has {sorted(rest)}, which belong to none of "
                             f"stem={stem!r}, blocks={blocks!r}, head={head!r}; " + _PROTOCOL_NEEDS
                             + " (fold them into the stem or the head module)")
        out[col] = parts
    return out


# --------------------------------------------------------------------------
# NNX
# --------------------------------------------------------------------------


class _NnxPart:
    """One NNX module, split into graph definitions for train and eval mode and
    pure-dict variables, called as ``(variables, x, train) -> (y, new_batch_stats)``."""

    def __init__(self, what: str, module: nnx.Module):
        self.what = what
        self.graphdefs = {}
        for train in (True, False):
            # nnx.view returns a new module with these static attributes set
            # (the user's module is left as it is); the attribute ends up in the
            # graph definition, so each mode has its own.
            viewed = nnx.view(module, use_running_average=not train, deterministic=True,
                              raise_if_not_found=False)
            self.graphdefs[train], params, stats, rest = nnx.split(
                viewed, nnx.Param, nnx.BatchStat, ...)
        # The variables are the same arrays in both views.
        self.params = nnx.to_pure_dict(params)
        self.batch_stats = nnx.to_pure_dict(stats)
        self.rest = rest  # other variables (e.g. RNG state of dropout): constants

    def __call__(self, params: Any, x: jax.Array, *extra, train: bool, batch_stats: Any,
                 rest: Any = None):
        # extra: the block index l; the variables are already those of block l.
        module = nnx.merge(self.graphdefs[train], nnx.State(params), nnx.State(batch_stats),
                           self.rest if rest is None else rest)
        y = module(x)
        return y, (nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)) if train else batch_stats)


def _block_list(container: Any, name: str) -> list:
    if isinstance(container, nnx.Sequential):
        return list(container.layers)
    if isinstance(container, (nnx.List, list, tuple)):
        return list(container)
    raise ValueError(f"model.{name} is a {type(container).__name__}: from_nnx needs the blocks as "
                     "an nnx.List, a list or an nnx.Sequential of modules; " + _PROTOCOL_NEEDS)


def from_nnx(model: nnx.Module, *, stem: str = "stem", blocks: str = "blocks",
             head: str = "head", activation: str | None = None
             ) -> tuple[FunctionModel, dict]:
    """An NNX network ``model.stem -> model.blocks[0..L-1] -> model.head`` as an
    analysable model, and its current variables.

    Args:
      model: an ``nnx.Module`` whose attributes ``stem``, ``blocks`` and
        ``head`` (names configurable) are modules; ``blocks`` an nnx.List,
        list or nnx.Sequential of L modules of one definition (same graph
        structure and shapes), each shape-preserving. The analysed network is
        ``head(blocks[L-1](... blocks[0](stem(x))))``: anything the model's
        own ``__call__`` does between them must move into stem or head.
      activation: optional activation name of the hidden states (gradient_flow).

    Returns ``(model, variables)``: variables as pure dicts, ``{"params":
    {"stem", "blocks", "head"}, "batch_stats": {...}}``, block leaves stacked
    along a leading axis of length L; ``nnx.Param`` go to params,
    ``nnx.BatchStat`` (BatchNorm's running averages) to batch_stats. The NNX
    module itself is not modified. ValueError when the blocks differ in
    structure (not one definition applied L times) or a part is missing.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"from_nnx expects an nnx.Module, got {type(model).__name__}")
    modules = {}
    for part, name in (("stem", stem), ("blocks", blocks), ("head", head)):
        if not hasattr(model, name):
            raise ValueError(f"{type(model).__name__} has no attribute {name!r} (the {part}); "
                             + _PROTOCOL_NEEDS + "; pass stem=, blocks=, head= to name them")
        modules[part] = getattr(model, name)
    block_modules = _block_list(modules["blocks"], blocks)
    if not block_modules:
        raise ValueError(f"model.{blocks} is empty: " + _PROTOCOL_NEEDS)
    stem_part, head_part = _NnxPart("stem", modules["stem"]), _NnxPart("head", modules["head"])
    block_parts = [_NnxPart(f"{blocks}[{i}]", b) for i, b in enumerate(block_modules)]
    first = block_parts[0]
    for i, part in enumerate(block_parts[1:], start=1):
        same = (part.graphdefs == first.graphdefs
                and jax.tree_util.tree_map(jnp.shape, (part.params, part.batch_stats))
                == jax.tree_util.tree_map(jnp.shape, (first.params, first.batch_stats)))
        if not same:
            raise ValueError(f"{blocks}[{i}] differs from {blocks}[0] in structure or shapes "
                             f"({type(block_modules[i]).__name__} vs "
                             f"{type(block_modules[0]).__name__}); " + _PROTOCOL_NEEDS)
    stack = lambda trees: jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)
    # The blocks share one definition, so block l runs block 0's graph with its
    # own variables (selected by the adapter from the stacked ones). Their
    # other variables (e.g. RNG state) are stacked and closed over.
    rest = stack([p.rest for p in block_parts])
    rests_empty = all(not jax.tree_util.tree_leaves(p.rest)
                      for p in (stem_part, head_part, *block_parts))

    def block_fn(params_l, h, l, *, train, batch_stats):
        rest_l = jax.tree_util.tree_map(lambda a: a[l - 1], rest)
        return first(params_l, h, train=train, batch_stats=batch_stats, rest=rest_l)

    variables = {
        "params": {"stem": stem_part.params, "blocks": stack([p.params for p in block_parts]),
                   "head": head_part.params},
        "batch_stats": {"stem": stem_part.batch_stats,
                        "blocks": stack([p.batch_stats for p in block_parts]),
                        "head": head_part.batch_stats},
    }
    # Graph definitions are hashable and equal for equal structure; with other
    # variables (closed-over constants) the key defaults to this call's functions.
    key = (("nnx", stem_part.graphdefs[True], stem_part.graphdefs[False], first.graphdefs[True],
            first.graphdefs[False], head_part.graphdefs[True], head_part.graphdefs[False],
            len(block_parts), activation) if rests_empty else None)
    fn_model = FunctionModel(
        stem_part, block_fn, head_part, len(block_parts), batch_coupled=True,
        activation=activation, cache_key=key,
        init_hint="an NNX model carries its own variables: use the variables returned by "
                  "from_nnx (nnx.Rngs choose the initial values)")
    return fn_model, variables


__all__ = ["from_linen", "from_nnx", "linen_variables"]
