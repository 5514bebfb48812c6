"""``vgrad analyze``: measure gradient flow through one model on one batch.

Loads a dataset, builds (or restores) a model, and on the first ``batch_size``
training examples runs ``jacobian_products``, ``gradient_flow`` and a Jacobian
spectrum (dense SVD when numel(h) <= ``DENSE_SPECTRUM_MAX_NUMEL``, otherwise
the top singular values by subspace iteration). It prints a per-layer table
and writes ``<out_dir>/analyze/<run-id>/``: ``config.json``, ``results.json``
and ``figures/*.png`` (Jacobian products with the mean-field prediction where
one exists, block Jacobians, gradient norms, spectrum).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import numpy as np

from vgrad.analysis import plots, theory
from vgrad.analysis.gradients import gradient_flow
from vgrad.analysis.jacobians import (jacobian_products, jacobian_spectrum,
                                      top_singular_values)
from vgrad import io
from vgrad.config import MAX_SEED, ConfigError, DataConfig, ModelConfig, to_dict
from vgrad.io import to_jsonable, write_json

DENSE_SPECTRUM_MAX_NUMEL = 2048
TOP_K_SINGULAR_VALUES = 10
TABLE_ROWS = 21


@dataclasses.dataclass(frozen=True)
class AnalyzeArgs:
    """Measure gradient flow through one model on one batch and write runs/analyze/<run-id>/."""

    model: ModelConfig = ModelConfig()
    """The model to analyse (must match the dataset's number of classes)."""
    data: DataConfig = DataConfig()
    """The dataset whose first ``batch_size`` training examples form the batch."""
    batch_size: int = 128
    """Examples in the analysed batch; Jacobians are of the whole-batch map."""
    num_probes: int = 8
    """Random probes per Jacobian estimate (relative error <= sqrt(2 / num_probes))."""
    train_mode: bool = True
    """BatchNorm uses batch statistics (as in training) or its running averages."""
    seed: int = 0
    """Seed of the model initialisation and of the probes."""
    checkpoint: str | None = None
    """A training run / checkpoint directory whose variables to analyse instead of a fresh init,
    under the model config they were trained with. Model fields given as well must agree with
    it (else an error names the fields that differ), unless override_model is set."""
    override_model: bool = False
    """With checkpoint: analyse its weights under the given model fields even where they differ
    from the checkpoint's (e.g. another activation); shapes must still match."""
    out_dir: str = "runs"
    """Root directory of results."""
    run_id: str | None = None
    """Run directory name (default: a timestamp)."""
    float64: bool = False
    """Run the analysis in float64 (jax_enable_x64) instead of float32, e.g. to check float32 results."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "num_probes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(name, value, f"invalid {name}={value!r}: must be an integer >= 1")
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ConfigError("seed", seed, f"invalid seed={seed!r}: must be an integer >= 0 "
                              "and <= 2**32 - 1 (a JAX PRNG seed)")
        for name in ("train_mode", "float64", "override_model"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name),
                                  f"invalid {name}={getattr(self, name)!r}: must be true or false")
        if self.run_id is not None:
            try:
                io.check_run_id(self.run_id)
            except ValueError as err:
                raise ConfigError("run_id", self.run_id, str(err)) from None
        if self.override_model and self.checkpoint is None:
            raise ConfigError("override_model", True, "invalid override_model=True without "
                              "checkpoint: it overrides the model config of a --checkpoint")


def model_for_checkpoint(args: AnalyzeArgs) -> ModelConfig:
    """The model config to analyse ``args.checkpoint`` under.

    The default ``model`` (``ModelConfig()``) means "as trained": the
    checkpoint's own config. Any other ``model`` must equal the checkpoint's
    config; if it differs, a ValueError names every differing field, unless
    ``args.override_model``: analysing trained weights under another model
    (say, another activation) is never silent. (``vgrad analyze`` lays only the
    ``--model.*`` flags you typed over the checkpoint's config, see
    :func:`with_model_fields`, so only those can differ.)
    """
    from vgrad.checkpoint import restore_model_config

    saved = restore_model_config(args.checkpoint)
    if args.model == ModelConfig():
        return saved
    differ = [f.name for f in dataclasses.fields(ModelConfig)
              if getattr(args.model, f.name) != getattr(saved, f.name)]
    if differ and not args.override_model:
        listed = "; ".join(f"model.{k}: checkpoint has {getattr(saved, k)!r}, given "
                           f"{getattr(args.model, k)!r}" for k in differ)
        raise ValueError(
            f"invalid model config for checkpoint {args.checkpoint!r}: it does not match the "
            f"config the checkpoint was trained with, {len(differ)} field(s) differ ({listed}). "
            "Drop those --model flags to analyse it as trained, or add --override-model true to "
            "analyse its weights under the given fields")
    return args.model


def with_model_fields(args: AnalyzeArgs, fields: set[str] | frozenset[str]) -> AnalyzeArgs:
    """``args`` whose model is the checkpoint's config with only ``fields`` taken
    from ``args.model`` (the ``--model.*`` flags the user typed); unchanged
    without a checkpoint or without such fields."""
    if args.checkpoint is None or not fields:
        return args
    from vgrad.checkpoint import restore_model_config

    saved = restore_model_config(args.checkpoint)
    given = {k: getattr(args.model, k) for k in fields if hasattr(saved, k)}
    return dataclasses.replace(args, model=dataclasses.replace(saved, **given))


def _load_variables(path: str, model: Any, x: Any) -> dict:
    """Variables saved under ``path`` by ``vgrad.checkpoint``, checked against the model."""
    from vgrad import checkpoint

    variables = checkpoint.restore_variables(path)
    expected = jax.eval_shape(model.init, jax.random.key(0), x)
    shapes = lambda tree: jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)
    got = {k: variables.get(k, {}) for k in ("params", "batch_stats")}
    if shapes(got) != shapes(expected):
        raise ValueError(f"checkpoint {path!r} does not match the model config {model.cfg!r}: "
                         f"variable shapes differ; the checkpoint was written by "
                         f"{checkpoint.restore_model_config(path)!r}")
    return got


def _load_batch(args: AnalyzeArgs) -> tuple[np.ndarray, np.ndarray, int, str]:
    from vgrad import data

    try:
        ds = data.load_config(args.data)
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        # A missing or unreadable data file is bad input: one clear line.
        raise ValueError(f"cannot load dataset {args.data.name!r} (data.path={args.data.path!r}): "
                         f"{err}") from err
    if args.model.num_classes != ds.num_classes:
        raise ValueError(f"model.num_classes={args.model.num_classes} but dataset "
                         f"{args.data.name!r} has num_classes={ds.num_classes}; set "
                         f"model.num_classes={ds.num_classes}")
    n = min(args.batch_size, len(ds.x_train))
    return (np.asarray(ds.x_train[:n], np.float32), np.asarray(ds.y_train[:n], np.int32),
            int(ds.num_classes), args.data.name)


def _theory(cfg: ModelConfig, input_second_moment: float) -> dict | None:
    """Mean-field numbers and the prediction propagated from the measured stem
    output's second moment, or {"applies": False, ...} where theory does not apply.

    kind "plain": q*, chi1 and the gradient depth scale 1/|log chi1|, and the
    correlation map's c*, chi_c and depth scale xi_c (Schoenholz et al. 2017);
    kind "preact_residual": the branch scale alpha at init (the stream has no
    fixed point, so only the propagated prediction)."""
    try:
        predicted = theory.predicted_log_product_sq_norms(
            cfg, input_second_moment=input_second_moment)
    except ValueError as err:
        return {"applies": False, "reason": str(err)}
    weight_var = theory.effective_weight_var(cfg)
    info = {"applies": True, "kind": "preact_residual" if cfg.residual else "plain",
            "effective_weight_var": weight_var, "bias_var": cfg.bias_var,
            "input_second_moment": input_second_moment,
            "predicted_log_product_sq_norms": predicted}
    if cfg.residual:
        return {**info, "residual_alpha": theory.residual_alpha_at_init(cfg)}
    fixed = theory.correlation_fixed_point(cfg.activation, weight_var, cfg.bias_var,
                                           cfg.leaky_slope)
    return {**info, "q_star": fixed.q_star,
            "chi1": theory.chi1(cfg.activation, weight_var, cfg.bias_var, cfg.leaky_slope,
                                q=fixed.q_star),
            "depth_scale": theory.depth_scale(cfg.activation, weight_var, cfg.bias_var,
                                              cfg.leaky_slope),
            "c_star": fixed.c_star, "chi_c": fixed.chi_c,
            "correlation_depth_scale": fixed.xi_c}


def _table_rows(L: int) -> list[int]:
    if L + 1 <= TABLE_ROWS:
        return list(range(L + 1))
    return sorted({int(round(v)) for v in np.linspace(0, L, TABLE_ROWS)})


def format_table(jac: Any, grad: Any) -> str:
    """Per-layer table (about TABLE_ROWS rows) of a JacobianReport and a GradientReport."""
    L = jac.depth
    log10 = 1.0 / math.log(10.0)
    head = (f"{'l':>5} {'log10 P_l':>10} {'log10 J_l':>10} {'|dL/dh^l|':>10} {'|dL/dW_l|':>10} "
            f"{'act mean':>9} {'act std':>9} {'saturated':>9} {'dead':>6}")
    lines = [head, "-" * len(head)]
    fmt = lambda v, spec: "-" if v is None or (isinstance(v, float) and math.isnan(v)) \
        else format(v, spec)
    for l in _table_rows(L):
        layer = float(jac.log_layer_sq_norms[l - 1]) * log10 if l >= 1 else None
        weight = float(grad.weight_grad_norms[l - 1]) if l >= 1 else None
        lines.append(
            f"{l:>5} {fmt(float(jac.log_product_sq_norms[l]) * log10, '10.2f')} "
            f"{fmt(layer, '10.3f'):>10} {fmt(float(grad.hidden_grad_norms[l]), '10.3e')} "
            f"{fmt(weight, '10.3e'):>10} {fmt(float(grad.activation_mean[l]), '9.3f')} "
            f"{fmt(float(grad.activation_std[l]), '9.3f')} "
            f"{fmt(float(grad.saturated_fraction[l]), '9.3f'):>9} "
            f"{fmt(float(grad.dead_fraction[l]), '6.3f'):>6}")
    return "\n".join(lines)


def _measure(args: AnalyzeArgs, model: Any, variables: dict, x: np.ndarray, y: np.ndarray,
             probe_key: jax.Array, sv_key: jax.Array) -> tuple[Any, Any, dict, dict]:
    """Jacobian products, gradient flow and spectrum of one batch, with timings."""
    timings = {}
    t = time.perf_counter()
    jac = jacobian_products(model, variables, x, train=args.train_mode, key=probe_key,
                            num_probes=args.num_probes)
    timings["jacobian_products_s"] = time.perf_counter() - t
    t = time.perf_counter()
    grad = gradient_flow(model, variables, {"x": x, "y": y}, train=args.train_mode)
    timings["gradient_flow_s"] = time.perf_counter() - t

    t = time.perf_counter()
    if jac.numel <= DENSE_SPECTRUM_MAX_NUMEL:
        sv = jacobian_spectrum(model, variables, x, train=args.train_mode,
                               max_numel=DENSE_SPECTRUM_MAX_NUMEL)
        with np.errstate(divide="ignore"):
            spectrum = {"method": "dense_svd", "singular_values": sv,
                        "log_singular_values": np.log(sv)}
    else:
        k = min(TOP_K_SINGULAR_VALUES, jac.numel)
        log_sv = top_singular_values(model, variables, x, train=args.train_mode, key=sv_key,
                                     k=k, log=True)
        spectrum = {"method": "subspace_iteration", "k": k, "singular_values": np.exp(log_sv),
                    "log_singular_values": log_sv}
    timings["spectrum_s"] = time.perf_counter() - t
    return jac, grad, spectrum, timings


def _check_free(run_dir: Any) -> None:
    """ValueError if ``run_dir`` already holds anything but a lock file: analyze
    never writes over an earlier run (of analyze, or of any other command)."""
    if run_dir.is_dir() and any(p.name != io.LOCK_FILE for p in run_dir.iterdir()):
        raise ConfigError("run_id", run_dir.name,
                          f"invalid run_id={run_dir.name!r}: {run_dir} already holds a run; "
                          "analyze never writes over a run, choose another --run-id")


def analyze(args: AnalyzeArgs) -> dict:
    """Run the analysis described by ``args``; returns the results dict (also written
    to results.json).

    With ``checkpoint``, the model config is the one the checkpoint was trained
    with; model fields given as well must agree with it unless
    ``override_model`` (see :func:`model_for_checkpoint`).

    Everything is checked before anything is written, and the results go to a
    new directory ``out_dir/analyze/<run_id>``: a run id is a name, not a path,
    and an existing, non-empty run directory is never written over.
    """
    from vgrad.models import build

    run_dir = io.run_dir_path(args.out_dir, "analyze", args.run_id)
    io.check_run_dir_free(run_dir)
    _check_free(run_dir)
    if args.checkpoint is not None:
        args = dataclasses.replace(args, model=model_for_checkpoint(args))

    x, y, num_classes, data_name = _load_batch(args)
    model = build(args.model)
    init_key, probe_key, sv_key = jax.random.split(jax.random.key(args.seed), 3)
    if args.checkpoint is not None:
        variables = _load_variables(args.checkpoint, model, x)
    else:
        variables = model.init(init_key, x)

    with jax.enable_x64(args.float64):
        if args.float64:  # cast once; every traced function then runs in float64
            variables, x = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), (variables, x))
        jac, grad, spectrum, timings = _measure(args, model, variables, x, y, probe_key, sv_key)
    h0 = model.hidden_states(variables, x, train=args.train_mode)[0]
    theory_info = _theory(args.model, float(np.mean(np.square(h0))))

    print(f"vgrad analyze: {args.model.arch} depth={args.model.depth} width={args.model.width} "
          f"activation={args.model.activation} init={args.model.init} norm={args.model.norm} "
          f"residual={args.model.residual} | data={data_name} batch={x.shape[0]} "
          f"train_mode={args.train_mode} | loss={grad.loss:.4f}")
    print(format_table(jac, grad))
    if theory_info and theory_info["applies"] and theory_info["kind"] == "plain":
        print(f"mean-field: q*={theory_info['q_star']:.4g} chi1={theory_info['chi1']:.4g} "
              f"gradient depth scale={theory_info['depth_scale']:.4g} blocks | "
              f"c*={theory_info['c_star']:.4g} chi_c={theory_info['chi_c']:.4g} "
              f"correlation depth scale xi_c={theory_info['correlation_depth_scale']:.4g} blocks")
    elif theory_info and theory_info["applies"]:
        print(f"mean-field (pre-activation residual, alpha={theory_info['residual_alpha']:.4g}): "
              f"log10 ||P_0||^2/n = "
              f"{theory_info['predicted_log_product_sq_norms'][0] / math.log(10):.3f}")
    print(f"end-to-end Jacobian dh^L/dh^0: top singular value "
          f"{float(np.max(spectrum['singular_values'])):.4g} ({spectrum['method']})")

    results = {
        "config": to_dict(args),
        "num_classes": num_classes,
        "batch_size": int(x.shape[0]),
        "jacobian": jac.to_dict(),
        "gradients": grad.to_dict(),
        "spectrum": spectrum,
        "theory": theory_info,
        "timings": timings,
        "run_dir": str(run_dir),
    }
    with io.run_dir_lock(run_dir):
        _check_free(run_dir)  # again, now that no other process can start writing it
        write_json(run_dir / "config.json", to_dict(args))
        write_json(run_dir / "results.json", results)

        figures = run_dir / "figures"
        label = f"{args.model.activation}/{args.model.init}"
        overlay = ({label: theory_info["predicted_log_product_sq_norms"]}
                   if theory_info and theory_info["applies"] else None)
        plots.save(plots.plot_layer_curves({label: jac}, theory=overlay), figures / "products.png")
        plots.save(plots.plot_layer_curves({label: jac}, quantity="layer"), figures / "layers.png")
        plots.save(plots.plot_grad_norms({label: grad}), figures / "grad_norms.png")
        plots.save(plots.plot_spectrum(spectrum["singular_values"]), figures / "spectrum.png")
    print(f"wrote {run_dir}")
    return to_jsonable(results)
