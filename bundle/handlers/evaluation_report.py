# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Final evaluation outputs: metrics.json, per-image scores, ROC / precision-recall curves, extreme-case grid."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from ..atomic import write_text_atomic
from ..conformal import ALPHAS, clopper_pearson
from ..visualize import save_extremes
from .operating_point import specificity_interval
from .volume_aggregator import VOLUME_COLUMNS, volume_row

__all__ = [
    "EvaluationReportHandler",
    "VolumeLevelMetrics",
    "auc_and_ap",
    "precision_recall_curve",
    "roc_curve",
    "volume_cases",
]

logger = logging.getLogger(__name__)


def _counts_per_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) when calling every score >= t abnormal, for each distinct t, highest first."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    return np.cumsum(y)[last_of_tie], np.cumsum(1 - y)[last_of_tie]


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every threshold, from (0, 0) to (1, 1)."""
    tp, fp = _counts_per_threshold(scores, labels)
    return np.r_[0, fp] / max(fp[-1], 1), np.r_[0, tp] / max(tp[-1], 1)


def precision_recall_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) over every threshold, highest threshold first."""
    tp, fp = _counts_per_threshold(scores, labels)
    return tp / max(tp[-1], 1), tp / (tp + fp)


def volume_cases(
    rows: Sequence[tuple[str, int, float]], slice_rows: Mapping[str, tuple[str, int]]
) -> dict[str, tuple[int, float]]:
    """One ``(label, score)`` per listed case from per-row ``(file, label, score)``: a row named in ``slice_rows``
    (row name -> ``(volume file, slice index)``, :attr:`bundle.data.ImageCache.slice_rows`) counts towards its volume,
    whose score is the highest of its slices' scores (score in [0, 1], label 0/1); any other row is its own case.

    Raises:
        ValueError: the slices of one volume carry different labels."""
    cases: dict[str, tuple[int, float]] = {}
    for file, label, score in rows:
        key = slice_rows[file][0] if file in slice_rows else file
        known = cases.setdefault(key, (label, score))
        if known[0] != label:
            raise ValueError(f"{key}: its slices carry the labels {known[0]} and {label}; a volume has one.")
        cases[key] = (label, max(known[1], score))
    return cases


def auc_and_ap(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float] | None:
    """ROC AUC and average precision (MONAI's ``compute_roc_auc`` / ``compute_average_precision``, as the evaluator's
    ``ROCAUC`` / ``AveragePrecision``) of (N,) scores for (N,) labels in {0, 1}; None without both classes."""
    from monai.metrics import compute_average_precision, compute_roc_auc

    if not ((labels == 0).any() and (labels == 1).any()):
        return None
    y_pred, y = torch.as_tensor(scores, dtype=torch.float64), torch.as_tensor(labels)
    return float(compute_roc_auc(y_pred, y)), float(compute_average_precision(y_pred, y))


class VolumeLevelMetrics:
    """Adds volume-level ``<prefix>volume_auc`` and ``<prefix>volume_ap`` to an evaluator's ``state.metrics`` when
    its data set takes volumes slice by slice (an :class:`bundle.data.ImageCache` with ``slice_rows``): one score per
    volume, its highest slice score (:func:`volume_cases`). Nothing is added for 2D data sets or when the cases hold
    one class only. For validation during training: list it in the evaluator's handlers before ``StatsHandler`` /
    ``TensorBoardStatsHandler`` so that they log it; the key metric stays slice-level.

    Reads ``filename`` from the decollated ``engine.state.batch`` and ``label``, ``score`` from
    ``engine.state.output``.
    """

    def __init__(self, prefix: str = "val_") -> None:
        self.prefix = prefix
        self.rows: list[tuple[str, int, float]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._compute)

    def _reset(self, _engine: Engine) -> None:
        self.rows = []

    def _collect(self, engine: Engine) -> None:
        for source, item in zip(engine.state.batch, engine.state.output):
            self.rows.append((str(source["filename"]), int(item["label"]), float(item["score"].item())))

    def _compute(self, engine: Engine) -> None:
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        slice_rows = getattr(dataset, "slice_rows", None) or {}
        if not any(row[0] in slice_rows for row in self.rows):
            return
        cases = volume_cases(self.rows, slice_rows)
        labels = np.array([label for label, _ in cases.values()])
        result = auc_and_ap(np.array([score for _, score in cases.values()]), labels)
        if result is not None:
            engine.state.metrics[f"{self.prefix}volume_auc"], engine.state.metrics[f"{self.prefix}volume_ap"] = result


class EvaluationReportHandler:
    """Collects (file, label, score, image, restored) from a decollated evaluator and, when it completes, writes
    into ``output_dir``: ``metrics.json`` (the evaluator's metrics, e.g. AUC and AP), ``scores.csv``,
    ``roc.png``, ``pr.png`` and ``extremes.png`` (the ``top_k`` highest- and lowest-scoring images with their
    restored images and heat maps, each titled with its score and true label; false alarms and misses at
    ``threshold`` in red: :func:`bundle.visualize.save_extremes`). It also prints the metrics.

    With the model's operating ``threshold`` (``abnormal = score > threshold``) the report adds ``sensitivity``
    and ``specificity`` at that threshold. With the model's ``settings`` recording how the threshold was set
    (``threshold_normals``, ``threshold_rank``), it adds ``specificity_interval``: where the specificity on this
    many normal images should lie if they are like those that set the threshold (95%,
    :func:`~bundle.handlers.operating_point.specificity_interval`), prints it beside the realised one and warns
    when the realised one falls outside.

    When the evaluator's items carry ``in_domain`` / ``domain_distance`` (:class:`bundle.domain.DomainCheckd`),
    ``scores.csv`` has those columns and ``metrics.json`` an ``out_of_domain`` entry: how many images were outside
    the model's training domain, in all and among the normal and the abnormal ones.

    When they carry ``p_value`` (:class:`bundle.conformal.ConformalPValued`), ``scores.csv`` has a last column
    ``p_value`` and ``metrics.json`` a ``conformal`` entry: for each ``alpha`` in
    :data:`~bundle.conformal.ALPHAS` (calling ``p_value <= alpha`` abnormal), the ``false_positive_rate`` realised on
    the evaluated normal images (at most ``alpha`` is promised for images like those that set the threshold), its
    95% Clopper-Pearson ``false_positive_rate_interval`` for that many normal images, and the ``sensitivity``; a
    warning says when ``alpha`` lies below that interval (the promise does not hold on these images).

    On a data set of 3D volumes taken slice by slice (the evaluator's data set an :class:`bundle.data.ImageCache`
    whose ``slice_rows`` name the volume and slice of each row), the metrics above are slice-level (each slice
    scored as an image, with its volume's label; its ``scores.csv`` row is ``<file>#slice=<k>``), and the report adds
    the volume level: ``volume_auc`` and ``volume_ap`` over one score per listed case (a volume's highest slice
    score, the aggregate of inference's volumes.csv; a 2D image listed beside volumes is its own case), with
    ``n_volumes_normal`` / ``n_volumes_abnormal`` and, with a ``threshold``, ``volume_sensitivity`` and
    ``volume_specificity`` (a volume is abnormal when its top slice is); and ``volumes.csv``, one row per volume:
    ``file``, ``label`` and the columns of inference's volumes.csv
    (:data:`~bundle.handlers.volume_aggregator.VOLUME_COLUMNS`). Without volumes none of these keys or files appear.

    ``metrics.json`` also says which listed images were not scored: ``n_skipped`` and ``skipped``
    (``[{"file", "label", "reason"}, ...]``): the bad images that the evaluator's data set (``ImageCache`` with
    ``on_bad_image="skip"``) left out, and any other listed image missing from the scores. An image scored more
    often than it is listed (a bad image replaced by another) stops the report with an error.
    """

    def __init__(
        self,
        output_dir: str,
        top_k: int = 8,
        extra_info: dict | None = None,
        threshold: float | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.output_dir = output_dir
        self.threshold = threshold
        self.settings = settings or {}
        self.top_k = top_k
        self.extra_info = extra_info or {}
        self.rows: list[tuple[str, int, float]] = []
        self.domain: list[tuple[float, float]] = []  # (in_domain 0/1, domain_distance) per row, when the model has it
        self.p_values: list[float] = []  # conformal p-value per row, when the model stores its normal scores
        self.images: list[torch.Tensor] = []
        self.restored: list[torch.Tensor] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _specificity_interval(self, realised: float, m: int) -> list[float] | None:
        """The 95% interval of the specificity on ``m`` normal images (None when the model does not record how its
        threshold was set); logs it beside the ``realised`` one, as a warning when that falls outside."""
        n, rank = self.settings.get("threshold_normals"), self.settings.get("threshold_rank")
        if not (n and rank and m) or self.threshold != self.settings.get("threshold"):  # not the model's threshold
            return None
        low, high = specificity_interval(int(n), int(rank), m)
        promised = self.settings.get("specificity")
        line = (
            f"specificity {realised:.3f} on {m} normal images; the threshold (the {promised} quantile of {n} normal "
            f"scores) puts 95% of such evaluations in [{low:.3f}, {high:.3f}]"
        )
        if low <= realised <= high:
            logger.info(line)
        else:
            logger.warning(
                f"{line}: OUTSIDE. These normal images score unlike those that set the threshold (a shift between "
                "the sets, or a checkpoint chosen on the images that set it): its false-alarm rate does not hold here."
            )
        return [low, high]

    @staticmethod
    def _conformal(p_values: np.ndarray, labels: np.ndarray) -> list[dict[str, Any]]:
        """For each alpha in :data:`~bundle.conformal.ALPHAS`: the false-positive rate of ``p_value <= alpha`` on
        the normal images (label 0) with its 95% Clopper-Pearson interval (None without normal images), and the
        sensitivity on the abnormal ones (None without any); ``p_values`` and ``labels``: (N,). Logs each line, as
        a warning when alpha lies below the interval."""
        normal, abnormal = p_values[labels == 0], p_values[labels == 1]
        levels = []
        for alpha in ALPHAS:
            false_positives = int((normal <= alpha).sum())
            rate = false_positives / normal.size if normal.size else None
            interval = list(clopper_pearson(false_positives, normal.size)) if normal.size else None
            sensitivity = float((abnormal <= alpha).mean()) if abnormal.size else None
            levels.append(
                {
                    "alpha": alpha,
                    "false_positives": false_positives,
                    "false_positive_rate": rate,
                    "false_positive_rate_interval": interval,
                    "sensitivity": sensitivity,
                }
            )
            if interval is None:
                continue
            line = (
                f"p-value <= {alpha}: {false_positives} of {normal.size} normal images flagged ({rate:.3f}, 95% "
                f"interval [{interval[0]:.3f}, {interval[1]:.3f}])"
            )
            if alpha < interval[0]:
                logger.warning(
                    f"{line}: more than the promised {alpha}. These normal images score unlike those that set the "
                    "threshold (a shift between the sets, or a checkpoint chosen on the images that set it)."
                )
            else:
                logger.info(line)
        return levels

    def _reset(self, engine: Engine) -> None:
        self.rows, self.images, self.restored, self.domain, self.p_values = [], [], [], [], []

    def _collect(self, engine: Engine) -> None:
        for source, item in zip(engine.state.batch, engine.state.output):  # both decollated
            self.rows.append((str(source["filename"]), int(item["label"]), float(item["score"].item())))
            if "in_domain" in item:
                self.domain.append((float(item["in_domain"].item()), float(item["domain_distance"].item())))
            if "p_value" in item:
                self.p_values.append(float(item["p_value"].item()))
            self.images.append(torch.as_tensor(item["image"]).detach().cpu())
            self.restored.append(torch.as_tensor(item["pred"]).detach().cpu())

    def _skipped(self, engine: Engine) -> list[dict]:
        """The images listed by the evaluator's data set that were not scored, with the reason when known.

        Raises:
            ValueError: an image was scored more often than it is listed."""
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        skipped = [
            {"file": s["file"], "label": s.get("label"), "reason": s["reason"]} for s in getattr(dataset, "skipped", [])
        ]
        known = {s["file"] for s in skipped}
        unscored = Counter(r[0] for r in self.rows)
        for item in getattr(dataset, "items", None) or []:
            file = str(item.get("filename", item.get("image")))
            if unscored[file] > 0:
                unscored[file] -= 1
            elif file not in known:  # skipped in a DataLoader worker process: its reason is in that worker's log
                skipped.append({"file": file, "label": item.get("label"), "reason": "unreadable during the run"})
                known.add(file)
        if hasattr(dataset, "items"):
            extra = [f for f, n in unscored.items() if n > 0]
            if extra:
                raise ValueError(
                    f"{len(extra)} image(s) were scored more often than they are listed, e.g. {extra[0]}: the metrics "
                    "would count them twice; was a bad image replaced by another one?"
                )
        return skipped

    def _volume_level(self, engine: Engine) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
        """Volume-level metrics and the rows of volumes.csv (see the class docstring); None when no row is a slice
        of a volume.

        Raises:
            ValueError: the slices of one volume carry different labels."""
        dataset = getattr(getattr(engine, "data_loader", None), "dataset", None)
        slice_rows: Mapping[str, tuple[str, int]] = getattr(dataset, "slice_rows", None) or {}
        if not any(row[0] in slice_rows for row in self.rows):
            return None
        infos = getattr(dataset, "volumes", {})
        has_domain = len(self.domain) == len(self.rows)
        has_p = len(self.p_values) == len(self.rows)
        cases = volume_cases(self.rows, slice_rows)  # volume (or a 2D image listed beside volumes) -> (label, score)
        slices: dict[str, dict[int, dict[str, Any]]] = {}
        for i, (file, _, score) in enumerate(self.rows):
            if file not in slice_rows:
                continue
            volume, index = slice_rows[file]
            slices.setdefault(volume, {})[index] = {
                "score": score,
                "abnormal": None if self.threshold is None else float(score > self.threshold),
                "p_value": self.p_values[i] if has_p else None,
                "in_domain": self.domain[i][0] if has_domain else None,
            }
        rows = []
        for volume, results in slices.items():
            info = infos[volume]
            row = volume_row(volume, info.spatial_shape, info.slice_axis, results, self.threshold)
            rows.append({"file": volume, "label": cases[volume][0], **{k: row[k] for k in VOLUME_COLUMNS[1:]}})
        labels = np.array([label for label, _ in cases.values()])
        scores = np.array([score for _, score in cases.values()])
        result = auc_and_ap(scores, labels)
        metrics: dict[str, Any] = {"volume_auc": None, "volume_ap": None}
        if result is not None:
            metrics["volume_auc"], metrics["volume_ap"] = result
        else:
            logger.warning(f"volume level: {len(cases)} volumes of one class only; no volume_auc or volume_ap.")
        metrics.update(n_volumes_normal=int((labels == 0).sum()), n_volumes_abnormal=int((labels == 1).sum()))
        if self.threshold is not None:
            called = scores > self.threshold
            metrics["volume_sensitivity"] = float(called[labels == 1].mean()) if (labels == 1).any() else None
            metrics["volume_specificity"] = float((~called)[labels == 0].mean()) if (labels == 0).any() else None
        return metrics, rows

    def _write_volumes(self, rows: list[dict[str, Any]]) -> None:
        """volumes.csv: ``file``, ``label`` and :data:`~bundle.handlers.volume_aggregator.VOLUME_COLUMNS`."""
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=["file", "label", *VOLUME_COLUMNS[1:]], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        write_text_atomic(os.path.join(self.output_dir, "volumes.csv"), text.getvalue(), errors="backslashreplace")

    def _write(self, engine: Engine) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        os.makedirs(self.output_dir, exist_ok=True)
        labels = np.array([r[1] for r in self.rows])
        scores = np.array([r[2] for r in self.rows])
        metrics = {k: float(v) for k, v in engine.state.metrics.items()}
        if self.threshold is not None:
            called = scores > self.threshold
            metrics["sensitivity"] = float(called[labels == 1].mean())
            metrics["specificity"] = float((~called)[labels == 0].mean())
        report = {**metrics, "n_normal": int((labels == 0).sum()), "n_abnormal": int((labels == 1).sum())}
        report["threshold"] = self.threshold
        if "specificity" in metrics:
            report["specificity_interval"] = self._specificity_interval(metrics["specificity"], report["n_normal"])
        skipped = self._skipped(engine)
        report.update(n_skipped=len(skipped), skipped=skipped)
        if self.domain and len(self.domain) == len(self.rows):
            outside = np.array([flag == 0.0 for flag, _ in self.domain])
            report["out_of_domain"] = {
                "n": int(outside.sum()),
                "rate": float(outside.mean()),
                "rate_normal": float(outside[labels == 0].mean()) if (labels == 0).any() else None,
                "rate_abnormal": float(outside[labels == 1].mean()) if (labels == 1).any() else None,
            }
            if outside.any():
                logger.warning(
                    f"{int(outside.sum())} of {len(outside)} images are outside the model's training domain (their "
                    "scores are not calibrated): in_domain 0 in scores.csv, out_of_domain in metrics.json"
                )
        p_values = np.array(self.p_values) if self.p_values and len(self.p_values) == len(self.rows) else None
        if p_values is not None:
            report["conformal"] = self._conformal(p_values, labels)
        volume_level = self._volume_level(engine)
        if volume_level is not None:
            report.update(volume_level[0])
            self._write_volumes(volume_level[1])
        report.update(self.extra_info)
        write_text_atomic(os.path.join(self.output_dir, "metrics.json"), json.dumps(report, indent=4))
        header, table = ["file", "label", "score"], [list(row) for row in self.rows]
        if self.domain and len(self.domain) == len(self.rows):
            header += ["in_domain", "domain_distance"]
            table = [[*row, int(flag), distance] for row, (flag, distance) in zip(table, self.domain)]
        if p_values is not None:
            header.append("p_value")
            table = [[*row, p] for row, p in zip(table, self.p_values)]
        scores_csv = io.StringIO()
        writer = csv.writer(scores_csv)
        writer.writerow(header)
        writer.writerows(table)
        # a file name that is not UTF-8 (surrogate-escaped by Python) is written as \udcXX instead of failing
        write_text_atomic(os.path.join(self.output_dir, "scores.csv"), scores_csv.getvalue(), errors="backslashreplace")
        name = {k: f"{k} = {v:.4f}" for k, v in metrics.items()}
        for fname, (xs, ys), (xl, yl), key in (
            ("roc.png", roc_curve(scores, labels), ("false positive rate", "true positive rate"), "auc"),
            ("pr.png", precision_recall_curve(scores, labels), ("recall", "precision"), "ap"),
        ):
            fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
            ax.plot(xs, ys, lw=1.5)
            ax.set(xlabel=xl, ylabel=yl, xlim=(0, 1), ylim=(0, 1.01))
            ax.set_title(", ".join(v for k, v in name.items() if k.endswith(key)) or fname[:-4], fontsize=9)
            fig.tight_layout()
            fig.savefig(os.path.join(self.output_dir, fname))
            plt.close(fig)
        order = np.argsort(-scores, kind="stable")
        k = min(self.top_k, len(order) // 2)
        picked = list(order[:k]) + list(order[::-1][:k])
        if picked:
            save_extremes(
                os.path.join(self.output_dir, "extremes.png"),
                torch.stack([self.images[i] for i in picked]),
                torch.stack([self.restored[i] for i in picked]),
                scores[picked],
                labels[picked],
                self.threshold,
                n_high=k,
            )
        summary = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        if volume_level is not None:
            level = volume_level[0]
            n = level["n_volumes_normal"] + level["n_volumes_abnormal"]
            shown = {k: level[k] for k in ("volume_auc", "volume_ap") if level[k] is not None}
            summary += "".join(f", {k} {v:.4f}" for k, v in shown.items())
            logger.info(
                f"volume level: {n} volumes ({level['n_volumes_normal']} normal, {level['n_volumes_abnormal']} "
                f"abnormal; score = highest slice score): "
                + (", ".join(f"{k} {v:.4f}" for k, v in shown.items()) or "no AUC (one class)")
                + f"; per volume in {os.path.join(self.output_dir, 'volumes.csv')}"
            )
        left_out = f", {len(skipped)} bad images skipped (listed in metrics.json)" if skipped else ""
        if skipped:
            logger.warning(f"{len(skipped)} listed images were not scored: " + ", ".join(s["file"] for s in skipped))
        logger.info(f"evaluation on {len(self.rows)} images{left_out}: {summary}; outputs in {self.output_dir}")
        print(f"RESULT {summary} ({len(self.rows)} images{left_out}; {self.output_dir}/metrics.json)", flush=True)
