"""Per-layer metrics in TensorBoard and W&B (vgrad.writers): thin mirrors of
metrics.jsonl and of the measurements, checked against them value by value."""

import glob
import math
import os
import struct
from collections import defaultdict

import pytest

from vgrad import ModelConfig, TrainConfig, data, sweep, writers
from vgrad.loop import fit
from vgrad.models import build

MODEL = ModelConfig(depth=3, width=8, num_classes=4, activation="tanh")
TRAIN = TrainConfig(batch_size=16, steps=6, eval_every=3)


@pytest.fixture(scope="module")
def ds():
    return data.load("synthetic", dim=8, num_train=64, num_test=16, num_classes=4)


def read_events(directory) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from the TFRecord event files in ``directory``
    (read with the record format and tensorboardX's own protobuf, not its writer)."""
    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = defaultdict(dict)
    for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
        blob = open(path, "rb").read()
        pos = 0
        while pos < len(blob):
            (length,) = struct.unpack("<Q", blob[pos:pos + 8])
            event = event_pb2.Event.FromString(blob[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                out[value.tag][event.step] = value.simple_value
    return out


def test_scalars_name_blocks_from_1_layers_from_0_and_drop_nonfinite():
    row = {"step": 3, "seed": 0, "loss": 1.5, "block_grad_norms": [0.1, 0.2],
           "log10_product_sq_norms": [-3.0, 0.0], "dead_fraction": [math.nan, math.nan],
           "finite": True, "test_accuracy": 0.5}
    assert writers.scalars(row) == {
        "train/loss": 1.5, "test/accuracy": 0.5, "weight_grad_norm/block_001": 0.1,
        "weight_grad_norm/block_002": 0.2, "log10_product_sq_norm/layer_000": -3.0,
        "log10_product_sq_norm/layer_001": 0.0}
    assert writers.run_name({"seed": 3}) == "seed-3" and writers.run_name({"run": 12, "seed": 3}) == "run-0012"


def test_tensorboard_mirrors_fit_records_one_run_per_seed(ds, tmp_path):
    tb = writers.TensorBoardWriter(tmp_path / "tb")
    result = fit(build(MODEL), TRAIN, ds, seeds=2, progress=False, writers=[tb])
    tb.close()
    assert sorted(os.listdir(tmp_path / "tb")) == ["seed-0", "seed-1"]
    for seed in (0, 1):
        events = read_events(tmp_path / "tb" / f"seed-{seed}")
        rows = [r for r in result.history if r["seed"] == seed]
        for row in rows:
            if "loss" in row:
                assert events["train/loss"][row["step"]] == pytest.approx(row["loss"], rel=1e-6)
                for l, norm in enumerate(row["block_grad_norms"], 1):
                    assert events[f"weight_grad_norm/block_{l:03d}"][row["step"]] == pytest.approx(norm, rel=1e-6)
            if "test_accuracy" in row:
                assert events["test/accuracy"][row["step"]] == pytest.approx(row["test_accuracy"])
        assert sorted(events["train/loss"]) == list(range(1, 7))


def test_tensorboard_has_the_measured_products_of_every_sweep_run(ds, tmp_path):
    tb = writers.TensorBoardWriter(tmp_path / "tb")
    runs = sweep.grid(MODEL, TRAIN, vary={"train.learning_rate": [0.01, 0.1]})
    result = sweep.run(runs, ds, measure_at=[0, 6], progress=False, writers=[tb])
    tb.close()
    for r in result.runs:
        events = read_events(tmp_path / "tb" / f"run-{r.index:04d}")
        for m in r.measurements:
            for l, value in enumerate(m["log10_product_sq_norms"]):
                assert events[f"log10_product_sq_norm/layer_{l:03d}"][m["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6)
            assert events["saturated_fraction/layer_001"][m["step"]] == pytest.approx(m["saturated_fraction"][1])
        assert "dead_fraction/layer_000" not in events  # NaN for tanh: not written


def test_wandb_offline_logs_every_record_of_every_run(ds, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    logged = defaultdict(list)
    original_init = wandb.init

    def spying_init(**kwargs):  # the real (offline) run, with its log calls recorded
        run = original_init(**kwargs)
        real_log = run.log

        def log(values, step=None):
            logged[kwargs["name"]].append((step, dict(values)))
            return real_log(values, step=step)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", spying_init)
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = writers.WandbWriter("vgrad-test", group="g", directory=tmp_path, mode="offline",
                            config={"depth": 3})
    result = fit(build(MODEL), TRAIN, ds, seeds=2, progress=False, writers=[w])
    w.close()
    assert sorted(logged) == ["seed-0", "seed-1"]
    for seed in (0, 1):
        steps = {step: values for step, values in logged[f"seed-{seed}"] if "train/loss" in values}
        for row in (r for r in result.history if r["seed"] == seed and "loss" in r):
            assert steps[row["step"]]["train/loss"] == pytest.approx(row["loss"])
            assert len([k for k in steps[row["step"]] if k.startswith("weight_grad_norm/")]) == 3
    offline = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(offline) == 2 and all(os.path.getsize(p) > 0 for p in offline)


def test_missing_backend_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboardx(name, *args, **kwargs):
        if name.startswith("tensorboardX"):
            raise ImportError("no tensorboardX")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboardx)
    with pytest.raises(ValueError, match=r"needs tensorboardX: pip install"):
        writers.TensorBoardWriter("x")
