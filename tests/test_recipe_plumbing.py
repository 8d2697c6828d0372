"""The plumbing that keeps ``configs/train.json`` a recipe: ``SelectionEvaluator`` (the val / pseudo-AUC evaluators),
``TrainingLogs`` (the trainer's loggers) and ``bundle.transforms.preprocessing``."""

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from monai.handlers import EarlyStopHandler, StatsHandler, TensorBoardStatsHandler
from PIL import Image
from torch import nn

from bundle.engines import SelectionEvaluator, TrainingLogs
from bundle.handlers import RestorationImageHandler
from bundle.transforms import AnomalyScored, preprocessing


class ZeroNet(nn.Module):
    """Restores every image to 0: the anomaly score is mean|x| / 2."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)


class Writer:
    """Records what a TensorBoard ``SummaryWriter`` is given."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.images: list[tuple[str, int]] = []

    def add_scalar(self, tag, value, step, *args, **kwargs):
        self.scalars.append((tag, float(value), int(step)))

    def add_image(self, tag, image, step, *args, **kwargs):
        self.images.append((tag, int(step)))

    def flush(self):
        pass


class MarkOperatingPoint:
    """Stands in for the operating-point handler: adds a metric at EPOCH_COMPLETED."""

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: e.state.metrics.update(val_mark=1.0))


class SeenMetrics:
    """A val handler that records the metrics it sees at EPOCH_COMPLETED."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, lambda e: self.seen.append(dict(e.state.metrics)))


def items(levels, labels):
    """Images (1, 4, 4) of constant value ``level`` (score ``|level| / 2``) with their labels."""
    return [{"image": torch.full((1, 4, 4), float(v)), "label": y} for v, y in zip(levels, labels)]


def attached(engine: Engine, cls: type) -> list:
    """The instances of ``cls`` with a handler on ``engine``, in the order of their first registration."""
    found = []
    for entries in engine._event_handlers.values():
        for entry in entries:
            owner = getattr(entry[0], "__self__", entry[0])
            if isinstance(owner, cls) and owner not in found:
                found.append(owner)
    return found


def trainer_at(iteration: int) -> Engine:
    trainer = Engine(lambda e, b: None)
    trainer.state.iteration = iteration
    return trainer


def evaluator(trainer, writer, **kwargs) -> SelectionEvaluator:
    # scores 0.05, 0.1 (normal), 0.15, 0.075 (abnormal): AUC 0.75, AP (1 + 2/3) / 2
    data = items([0.1, 0.2, 0.3, 0.15], [0, 0, 1, 1])
    args = dict(device="cpu", dataset=data, network=ZeroNet(), operating_point=MarkOperatingPoint(), trainer=trainer)
    args.update(summary_writer=writer, metric_name="val_auc", postprocessing=AnomalyScored(), batch_size=3)
    return SelectionEvaluator(**{**args, **kwargs})


def test_selection_evaluator_metrics_logs_and_handler_order():
    writer, seen = Writer(), SeenMetrics()
    ev = evaluator(trainer_at(40), writer, ap_metric_name="val_ap", val_handlers=[None, seen])
    ev.run()
    assert ev.state.metrics["val_auc"] == pytest.approx(0.75)
    assert ev.state.metrics["val_ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert len(ev.data_loader) == 2  # batch_size 3 over 4 items, no shuffling
    # the operating point runs first: the loggers and the val handlers see its metric
    assert seen.seen == [{"val_auc": pytest.approx(0.75), "val_ap": pytest.approx(0.8333333), "val_mark": 1.0}]
    assert {t: s for t, _, s in writer.scalars} == {"val_auc": 40, "val_ap": 40, "val_mark": 40}  # trainer's step
    assert len(attached(ev, StatsHandler)) == 1 and len(attached(ev, TensorBoardStatsHandler)) == 1
    assert attached(ev, EarlyStopHandler) == []  # patience 0: never stops
    assert ev.operating_point is not None and ev.metric_name == "val_auc"


def test_selection_evaluator_without_average_precision_and_off_rank_zero(monkeypatch):
    ev = evaluator(trainer_at(1), Writer(), metric_name="val_pseudo_auc")
    ev.run()
    assert set(ev.state.metrics) == {"val_pseudo_auc", "val_mark"}
    monkeypatch.setattr("bundle.engines.evaluation._is_rank_zero", lambda: False)
    quiet = evaluator(trainer_at(1), Writer())
    assert attached(quiet, StatsHandler) == [] and attached(quiet, TensorBoardStatsHandler) == []


@pytest.mark.parametrize("metric, stops", [("val_auc", True), ("val_pseudo_auc", False), (None, False)])
def test_selection_evaluator_early_stop_watches_its_own_metric(metric, stops):
    trainer = trainer_at(10)
    ev = evaluator(trainer, Writer(), early_stop_patience=1, early_stop_metric=metric)
    assert len(attached(ev, EarlyStopHandler)) == int(stops)
    ev.run()
    ev.run()  # the same AUC again: no improvement for 1 validation
    assert trainer.should_terminate is stops


def test_training_logs_attach_the_loggers_at_their_intervals():
    writer = Writer()
    empty, labelled = [], items([0.1, 0.2, 0.3], [0, 1, 0])
    logs = TrainingLogs(writer, ZeroNet(), [empty, labelled], log_interval=2, tensorboard_interval=3,
                        image_log_interval=4, progress_bar=False)  # fmt: skip
    assert logs.rank_zero_only
    grid = next(h for h in logs.handlers if isinstance(h, RestorationImageHandler))
    assert grid.images.shape == (3, 1, 4, 4)  # the first non-empty set's normal, then abnormal images
    assert torch.equal(grid.images[:, 0, 0, 0], torch.tensor([0.1, 0.3, 0.2]))
    trainer = Engine(lambda e, b: {"d_loss": torch.tensor(1.0), "g_loss": torch.tensor(2.0)})
    logs.attach(trainer)
    trainer.run(range(6), max_epochs=1)
    assert [(t, s) for t, _, s in writer.scalars] == [("d_loss", 3), ("g_loss", 3), ("d_loss", 6), ("g_loss", 6)]
    assert writer.images == [("restoration", 4), ("restoration", 6)]  # every 4 and at the end
    assert attached(trainer, ProgressBar) == []
    bar = TrainingLogs(Writer(), ZeroNet(), [labelled], progress_bar=True)
    assert any(isinstance(h, ProgressBar) for h in bar.handlers)


def test_preprocessing_grey_resized_and_scaled(tmp_path):
    path = str(tmp_path / "x.png")
    Image.fromarray(np.tile(np.array([0, 255], np.uint8), (32, 16))).save(path)
    out = preprocessing(image_size=8)({"image": path})["image"]
    assert type(out) is torch.Tensor and out.shape == (1, 8, 8)  # plain tensor: what the caches hold
    assert -1.0 <= out.min() < out.max() <= 1.0
    kept = preprocessing(image_size=8, keep_metadata=True)({"image": path})["image"]
    assert type(kept).__name__ == "MetaTensor" and torch.allclose(kept.as_tensor(), out)
