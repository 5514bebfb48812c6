"""Training, the public face: ``vgrad.train.fit`` and the pieces it is made of.

Everything here is defined in two layers and re-exported:

* :mod:`vgrad.steps` (the lowest layer): ``TrainState``, the optimiser
  (``make_optimizer``, with clipping and injected hyperparameters),
  ``create_state`` / ``init_state``, the jitted ``make_train_step`` /
  ``make_eval_step``, ``evaluate`` and the checks and messages of a run;
* :mod:`vgrad.loop`: ``fit`` (one run or N seeds) and ``FitResult``, on the
  engine that also trains the grids of :mod:`vgrad.sweep`.

``from vgrad.train import fit, create_state, make_train_step`` and
``vgrad.train.fit(...)`` work as they always have.
"""

from vgrad.loop import FitResult, fit
from vgrad.steps import (HYPERPARAMS, TrainState, as_numpy_metrics, block_norms, check_run,
                         create_state, cross_entropy, describe_nonfinite, eval_step_fn, evaluate,
                         hyperparams, init_state, make_eval_step, make_optimizer, make_schedule,
                         make_train_step, nonfinite_layers, part_norms, seed_keys, total_steps,
                         train_step_fn)

__all__ = [
    "FitResult", "HYPERPARAMS", "TrainState", "as_numpy_metrics", "block_norms", "check_run",
    "create_state", "cross_entropy", "describe_nonfinite", "eval_step_fn", "evaluate", "fit",
    "hyperparams", "init_state", "make_eval_step", "make_optimizer", "make_schedule",
    "make_train_step", "nonfinite_layers", "part_norms", "seed_keys", "total_steps", "train_step_fn",
]
