# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""DICOM results for DICOM inputs (``--output_format dicom``): a DICOM Segmentation (SEG) of the anomaly regions and
a Comprehensive SR (TID 1500 measurement report) with the image-level result, both written with highdicom and both
referencing the source image's study, series and SOP instance.

- SEG: one BINARY segment "Anomaly region" on the source image's grid (Rows x Columns, one frame per source
  frame), the regions of :mod:`bundle.transforms.regions` (smoothed heat map above the model's ``pixel_threshold``,
  specks removed) mapped back from the model grid by nearest neighbour. Pixel spacing, plane position and
  orientation are copied by highdicom from the source where it has them.
- SR: Comprehensive SR (the SR IOD the DICOM standard lists for TID 1500 that holds all of this 2D, image-level
  content without the 3D coordinates Comprehensive 3D SR exists for, and which DICOM viewers and toolkits read
  widely). One measurement group (TID 1501) with the source image, the algorithm (name, bundle version, model file
  and sha256; TID 4019), the finding Abnormal/Normal (the decision), the measurements anomaly score, p-value (when the
  model stores normal scores), score threshold, alpha (when set), pixel threshold, domain distance, and the
  qualitative evaluation "within the training domain" Yes/No (when the model stores a domain check).

Concepts that no standard terminology names (anomaly score, conformal p-value, ...) use the local coding scheme
:data:`CODING_SCHEME` (DICOM reserves designators starting with "99" for local codes).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from monai.transforms import MapTransform

from ..atomic import write_atomic
from .io import SLICE_INDEX_KEY, DicomSeries
from .regions import MIN_REGION_SIZE, find_regions, region_mask

if TYPE_CHECKING:  # highdicom is needed only when DICOM is written
    from highdicom.seg import Segmentation
    from highdicom.sr import ComprehensiveSR
    from pydicom.dataset import Dataset

__all__ = [
    "CODING_SCHEME",
    "OUTPUT_FORMATS",
    "SaveDicomSegSRd",
    "build_segmentation",
    "build_series_structured_report",
    "build_structured_report",
    "model_identity",
    "read_source_dicom",
    "source_grid_mask",
    "write_series_seg_sr",
]

logger = logging.getLogger(__name__)

OUTPUT_FORMATS = ("default", "dicom")
CODING_SCHEME = "99SAGAN"
ALGORITHM_NAME = "SAGAN anomaly detection"
MANUFACTURER = "SAGAN bundle authors"
SEG_SERIES_NUMBER = 9001
SR_SERIES_NUMBER = 9002
DICOM_SUFFIXES = (".dcm", ".dicom")


def model_identity(model_path: str | None) -> dict[str, str]:
    """``{"bundle_version", "model_file", "model_sha256"}`` of the model that produced a result (``model_file`` and
    ``model_sha256`` are empty strings when ``model_path`` is None or missing)."""
    from .. import __version__
    from ..pretrained import sha256_of

    exists = model_path is not None and os.path.isfile(model_path)
    return {
        "bundle_version": __version__,
        "model_file": os.path.basename(model_path) if model_path else "",
        "model_sha256": sha256_of(model_path) if exists else "",
    }


def read_source_dicom(filename: str) -> Dataset | None:
    """The header (no pixel data) of a DICOM image file, or None when ``filename`` is not one (PNG, NIfTI, a DICOM
    object without SOP class or instance UID)."""
    import pydicom

    try:
        ds = pydicom.dcmread(filename, stop_before_pixels=True, force=True)  # also files without the preamble
    except Exception:
        return None
    if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds or "Rows" not in ds or "Columns" not in ds:
        return None
    return ds


def source_grid_mask(
    heatmap: torch.Tensor,
    pixel_threshold: float,
    rows: int,
    columns: int,
    frames: int = 1,
    frame_index: int | None = None,
    min_size: int = MIN_REGION_SIZE,
) -> np.ndarray:
    """The anomaly regions of a model-grid heat map on a DICOM image's pixel grid.

    Args:
        heatmap: (1, h, w) or (h, w) heat map |x - x'|, values in [0, 2], in MONAI's spatial order as the image loader
            produced it (first axis along the DICOM columns, second along the rows).
        pixel_threshold: the model's pixel threshold on the smoothed heat map, in [0, 2].
        rows, columns: the DICOM image's Rows and Columns.
        frames: the DICOM image's number of frames.
        frame_index: which frame was scored (negative counts from the end); None for a single-frame image.
        min_size: regions smaller than this many model-grid pixels are removed (:func:`region_mask`).

    Returns:
        (frames, rows, columns) uint8 in {0, 1}: 1 inside an anomaly region, only in the scored frame.
    """
    labels, smoothed = region_mask(heatmap, pixel_threshold, min_size)
    mapped, _ = find_regions(labels, smoothed, (columns, rows))
    mask = np.zeros((frames, rows, columns), np.uint8)
    mask[(frame_index or 0) % frames] = (mapped > 0).T
    return mask


def _code(value: str, meaning: str) -> Any:
    from pydicom.sr.coding import Code

    return Code(value, CODING_SCHEME, meaning)


def build_segmentation(
    source: Dataset | Sequence[Dataset], mask: np.ndarray, result: Mapping[str, Any], omit_empty_frames: bool = False
) -> Segmentation:
    """A DICOM SEG (binary, one segment "Anomaly region") of ``mask`` on the source image or series.

    Args:
        source: the source image's dataset, or the (N,) datasets of a series' single-frame instances in slice order
            (pixel data not needed): patient, study, frame of reference, pixel spacing and plane positions are taken
            from them, and they are referenced as the derivation sources.
        mask: (rows, columns) or (frames, rows, columns) with values in {0, 1}, the source's Rows x Columns (and
            NumberOfFrames); for a series (N, rows, columns), frame k on ``source[k]``. Every frame is written, also
            empty ones, so that frame i is source frame i, unless ``omit_empty_frames``.
        result: at least ``bundle_version``, ``model_file`` and ``model_sha256`` (:func:`model_identity`).
        omit_empty_frames: leave out frames without a region (each written frame names its source instance); all
            sources are referenced all the same.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    algorithm = hd.AlgorithmIdentificationSequence(
        name=ALGORITHM_NAME,
        family=codes.cid7162.ArtificialIntelligence,
        version=str(result["bundle_version"]),
        parameters={"model": str(result["model_file"]), "sha256": str(result["model_sha256"])},
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Anomaly region",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=_code("anomaly-region", "Anomaly region"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=np.asarray(mask, np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ALGORITHM_NAME,
        software_versions=str(result["bundle_version"]),
        device_serial_number=str(result["model_sha256"])[:64] or "unknown",
        content_label="ANOMALY",
        content_description="SAGAN anomaly regions (research use only)",
        omit_empty_frames=omit_empty_frames,
    )


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def build_structured_report(source: Dataset, result: Mapping[str, Any]) -> ComprehensiveSR:
    """A Comprehensive SR (TID 1500 "Imaging Measurement Report") with the image-level result of the source image.

    Args:
        source: the source image's dataset (pixel data not needed): patient and study are taken from it; it is the
            measurement group's source image and the report's evidence.
        result: ``score`` (anomaly score, [0, 1]); optional, left out of the report when absent, None or NaN:
            ``abnormal`` (bool, the decision), ``threshold`` (score threshold, [0, 1]), ``alpha`` (false-alarm rate,
            (0, 1), when the decision is ``p_value <= alpha``), ``p_value`` ([1 / (n + 1), 1]), ``pixel_threshold``
            ([0, 2]), ``in_domain`` (bool), ``domain_distance`` (>= 0); and the model's ``bundle_version``,
            ``model_file``, ``model_sha256`` (:func:`model_identity`).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    no_units = Code("1", "UCUM", "no units")
    numbers = [
        ("score", "anomaly-score", "Anomaly score"),
        ("p_value", "p-value", "Conformal p-value"),
        ("threshold", "score-threshold", "Anomaly score threshold"),
        ("alpha", "alpha", "False-alarm rate alpha"),
        ("pixel_threshold", "pixel-threshold", "Anomaly region pixel threshold"),
        ("domain_distance", "domain-distance", "Training domain distance"),
    ]
    measurements = [
        hd.sr.Measurement(name=_code(code, meaning), value=float(result[key]), unit=no_units)
        for key, code, meaning in numbers
        if _present(result.get(key))
    ]
    evaluations = []
    if _present(result.get("in_domain")):
        inside = codes.SCT.Yes if result["in_domain"] else codes.SCT.No
        evaluations.append(hd.sr.QualitativeEvaluation(_code("in-domain", "Within the training domain"), inside))
    finding = None
    if _present(result.get("abnormal")):
        finding = codes.SCT.Abnormal if result["abnormal"] else codes.SCT.Normal
    return _measurement_report([source], [source], measurements, evaluations, finding, result)


def _measurement_report(
    evidence: Sequence[Dataset],
    group_sources: Sequence[Dataset],
    measurements: list,
    evaluations: list,
    finding: Any,
    result: Mapping[str, Any],
) -> ComprehensiveSR:
    """The Comprehensive SR (TID 1500) of one measurement group: ``measurements`` and ``evaluations`` (highdicom
    items), the ``finding`` (a code or None), the algorithm of ``result`` (:func:`model_identity`), the source images
    ``group_sources`` of the group (may be empty), and ``evidence`` (the referenced instances, patient and study
    taken from the first)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    parameters = [f"model file {result['model_file']}", f"model sha256 {result['model_sha256']}"]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="SAGAN anomaly assessment"),
        finding_type=finding,
        algorithm_id=hd.sr.AlgorithmIdentification(ALGORITHM_NAME, str(result["bundle_version"]), parameters),
        measurements=measurements,
        qualitative_evaluations=evaluations or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(s) for s in group_sources] or None,
    )
    # the observer is the model: the same model file gives the same device UID
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[str(result["model_sha256"]) or str(result["model_file"])]),
        name=ALGORITHM_NAME,
        manufacturer_name=MANUFACTURER,
        model_name=str(result["model_file"])[:64] or None,
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    report = hd.sr.MeasurementReport(
        observation_context=context, procedure_reported=codes.SCT.ImagingProcedure, imaging_measurements=[group]
    )
    return hd.sr.ComprehensiveSR(
        evidence=list(evidence),
        content=report[0],
        series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,  # unverified output of a research model
        is_verified=False,
    )


# the volume result in a series' SR: (volumes.csv column, code value, meaning); "" values are left out
SERIES_MEASUREMENTS = (
    ("volume_score", "volume-anomaly-score", "Volume anomaly score"),
    ("top_slice", "top-slice", "Top slice index"),
    ("top_slice_score", "anomaly-score", "Anomaly score"),
    ("p_value_of_top_slice", "p-value", "Conformal p-value"),
    ("volume_p_value", "volume-p-value", "Volume p-value"),
    ("slices", "slices", "Slices"),
    ("slices_scored", "slices-scored", "Scored slices"),
    ("abnormal_slices", "abnormal-slices", "Abnormal slices"),
    ("in_domain_slices", "in-domain-slices", "Scored slices within the training domain"),
)


def build_series_structured_report(
    sources: Sequence[Dataset], row: Mapping[str, Any], result: Mapping[str, Any], top_source: Dataset | None = None
) -> ComprehensiveSR:
    """A Comprehensive SR (TID 1500) with the volume-level result of a DICOM series scored slice by slice.

    Args:
        sources: the (N,) datasets of the series' instances (pixel data not needed), all referenced as evidence.
        row: the series' row of volumes.csv (:func:`bundle.handlers.volume_aggregator.volume_row`): the
            measurements of :data:`SERIES_MEASUREMENTS` (columns that are ``""`` left out; ``top_slice`` is the
            index in position order), the finding Abnormal/Normal from ``abnormal``, and "within the training
            domain" Yes when every scored slice is (``in_domain_slices == slices_scored``).
        result: ``threshold``, ``alpha``, ``pixel_threshold`` (each left out when None) and the model's
            ``bundle_version``, ``model_file``, ``model_sha256`` (:func:`model_identity`).
        top_source: the instance of the top slice, the measurement group's source image (None: no source image in
            the group, e.g. slices taken across the instances).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    no_units = Code("1", "UCUM", "no units")
    values = [(row.get(key), code, meaning) for key, code, meaning in SERIES_MEASUREMENTS]
    values += [
        (result.get("threshold"), "score-threshold", "Anomaly score threshold"),
        (result.get("alpha"), "alpha", "False-alarm rate alpha"),
        (result.get("pixel_threshold"), "pixel-threshold", "Anomaly region pixel threshold"),
    ]
    measurements = [
        hd.sr.Measurement(name=_code(code, meaning), value=float(value), unit=no_units)
        for value, code, meaning in values
        if value not in ("", None) and _present(float(value))
    ]
    evaluations = []
    if row.get("in_domain_slices", "") != "":
        inside = codes.SCT.Yes if int(row["in_domain_slices"]) == int(row["slices_scored"]) else codes.SCT.No
        evaluations.append(hd.sr.QualitativeEvaluation(_code("in-domain", "Within the training domain"), inside))
    finding = None
    if row.get("abnormal", "") != "":
        finding = codes.SCT.Abnormal if int(row["abnormal"]) else codes.SCT.Normal
    group_sources = [] if top_source is None else [top_source]
    return _measurement_report(sources, group_sources, measurements, evaluations, finding, result)


def _item_value(value: Any) -> Any:
    """A decollated item's (1,) tensor as a Python float (None stays None)."""
    if value is None:
        return None
    return float(torch.as_tensor(value).reshape(-1)[0])


class SaveDicomSegSRd(MapTransform):
    """Writes ``<output_dir>/<input name>_seg.dcm`` (DICOM SEG of the anomaly regions, :func:`build_segmentation`)
    and ``<input name>_sr.dcm`` (Comprehensive SR with the result, :func:`build_structured_report`) for every DICOM
    input when ``output_format`` is ``"dicom"``; does nothing for ``"default"``.

    A non-DICOM input (PNG, NIfTI), a DICOM input highdicom cannot build a SEG or SR from (e.g. a header without
    study UID) or a model without a ``pixel_threshold`` (no SEG; the SR is written) gets a warning naming the file;
    the run goes on and its other outputs are written as usual.

    Args:
        keys: the heat map key: (1, h, w) |x - x'| in [0, 2] at the model grid, a MetaTensor whose metadata has
            ``filename_or_obj`` (the input file).
        output_dir: where the files go (the folder of scores.csv and the heat maps).
        output_format: ``"default"`` (nothing written here) or ``"dicom"``.
        threshold: the model's score threshold (``abnormal = score > threshold``), recorded in the SR.
        pixel_threshold: the model's pixel threshold on the smoothed heat map, [0, 2]; None: no SEG.
        alpha: the false-alarm rate of the decision ``p_value <= alpha`` when set, recorded in the SR.
        slice_index: the frame of a multi-frame DICOM image that was scored (as given to the image loader).
        model_path: the model file, whose name and sha256 the SEG and SR record.
        min_size: regions smaller than this many model-grid pixels are removed.
    """

    def __init__(
        self,
        keys: str = "heatmap",
        output_dir: str = "outputs",
        output_format: str = "default",
        threshold: float | None = None,
        pixel_threshold: float | None = None,
        alpha: float | None = None,
        slice_index: int | None = None,
        model_path: str | None = None,
        min_size: int = MIN_REGION_SIZE,
    ) -> None:
        super().__init__(keys)
        if output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {output_format!r}.")
        self.output_dir, self.output_format = output_dir, output_format
        self.threshold, self.pixel_threshold, self.alpha = threshold, pixel_threshold, alpha
        self.slice_index, self.model_path, self.min_size = slice_index, model_path, min_size
        self._model: dict[str, str] | None = None

    def model(self) -> dict[str, str]:
        """:func:`model_identity` of ``model_path``, computed once."""
        if self._model is None:
            self._model = model_identity(self.model_path)
        return self._model

    def result(self, data: Mapping[Hashable, Any]) -> dict[str, Any]:
        """The SR's values from a decollated item (see :func:`build_structured_report`)."""
        abnormal, in_domain = _item_value(data.get("abnormal")), _item_value(data.get("in_domain"))
        return {
            "score": _item_value(data["score"]),
            "abnormal": None if abnormal is None else abnormal > 0.5,
            "threshold": self.threshold,
            "alpha": self.alpha,
            "p_value": _item_value(data.get("p_value")),
            "pixel_threshold": self.pixel_threshold,
            "in_domain": None if in_domain is None else in_domain > 0.5,
            "domain_distance": _item_value(data.get("domain_distance")),
            **self.model(),
        }

    def output_paths(self, filename: str) -> tuple[str, str]:
        """``(<output_dir>/<name>_seg.dcm, <output_dir>/<name>_sr.dcm)`` for an input file."""
        name = os.path.basename(filename)
        if name.lower().endswith(DICOM_SUFFIXES):
            name = os.path.splitext(name)[0]
        return os.path.join(self.output_dir, f"{name}_seg.dcm"), os.path.join(self.output_dir, f"{name}_sr.dcm")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.output_format != "dicom":
            return d
        for key in self.key_iterator(d):
            filename = str(getattr(d[key], "meta", {}).get("filename_or_obj", ""))
            if filename and os.path.isdir(filename):  # a DICOM series: VolumeAggregator writes one SEG and SR for it
                if SLICE_INDEX_KEY not in getattr(d.get("image"), "meta", {}):
                    logger.warning(
                        f"{filename}: a DICOM series scored at the model's slice_index only: no DICOM SEG/SR is "
                        "written for it (they are written for series scored slice by slice)."
                    )
                continue
            source = read_source_dicom(filename) if filename else None
            if source is None:
                logger.warning(
                    f"{filename or 'an input without a file name'}: not a DICOM image, so no DICOM SEG/SR is written "
                    "for it (output_format dicom); its scores and heat map are written as usual."
                )
                continue
            self._write(source, filename, torch.as_tensor(d[key]), d)
        return d

    def _write(self, source: Dataset, filename: str, heatmap: torch.Tensor, data: Mapping[Hashable, Any]) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        seg_path, sr_path = self.output_paths(filename)
        result = self.result(data)
        if self.pixel_threshold is None:
            logger.warning(f"{filename}: the model stores no pixel_threshold, so no DICOM SEG of regions is written.")
        else:
            frames = int(getattr(source, "NumberOfFrames", 1) or 1)
            mask = source_grid_mask(
                heatmap,
                self.pixel_threshold,
                int(source.Rows),
                int(source.Columns),
                frames,
                self.slice_index if frames > 1 else None,
                self.min_size,
            )
            try:
                seg = build_segmentation(source, mask if frames > 1 else mask[0], result)
                write_atomic(seg_path, seg.save_as)
            except Exception as e:  # highdicom refuses headers that lack what a SEG must copy
                logger.warning(f"{filename}: cannot write a DICOM SEG ({type(e).__name__}: {e}).")
        try:
            write_atomic(sr_path, build_structured_report(source, result).save_as)
        except Exception as e:
            logger.warning(f"{filename}: cannot write a DICOM SR ({type(e).__name__}: {e}).")


def write_series_seg_sr(
    series: DicomSeries,
    label: np.ndarray | None,
    row: Mapping[str, Any],
    result: Mapping[str, Any],
    output_dir: str,
    slice_axis: int = 2,
    name: str | None = None,
) -> list[str]:
    """Writes ``<output_dir>/<name>_seg.dcm`` and ``<name>_sr.dcm`` for a DICOM series scored slice by slice: ONE
    SEG whose frames are the slices of ``label`` that hold a region, each on its source instance (every
    instance of the series referenced), and ONE SR with the volume result (:func:`build_series_structured_report`;
    the measurement group's source image is the top slice's instance when the slices were taken along the
    instances, ``slice_axis`` 2).

    Args:
        series: the series (its instances in slice order).
        label: (columns, rows, N) uint8 in {0, 1}, the label map of the volume (MONAI's order, as the label NIfTI);
            None: no SEG (the model has no pixel threshold), with a warning.
        row: the series' row of volumes.csv.
        result: ``threshold``, ``alpha``, ``pixel_threshold`` and :func:`model_identity`.
        output_dir: where the files go.
        slice_axis: the axis the slices were scored along.
        name: the stem of the two file names (default: the series folder's name).

    Returns:
        The paths written. A SEG or SR that highdicom cannot build is named in a warning, not raised.
    """
    import pydicom

    os.makedirs(output_dir, exist_ok=True)
    name = name or os.path.basename(os.path.abspath(series.folder))
    seg_path, sr_path = (os.path.join(output_dir, f"{name}_{kind}.dcm") for kind in ("seg", "sr"))
    sources = [pydicom.dcmread(f, stop_before_pixels=True, force=True) for f in series.files]
    written = []
    if label is None:
        logger.warning(f"{series.folder}: the model stores no pixel_threshold, so no DICOM SEG of regions is written.")
    else:
        frames = np.ascontiguousarray(np.transpose(np.asarray(label, np.uint8), (2, 1, 0)))  # (N, rows, columns)
        try:
            seg = build_segmentation(sources, frames, result, omit_empty_frames=bool(frames.any()))
            write_atomic(seg_path, seg.save_as)
            written.append(seg_path)
        except Exception as e:  # highdicom refuses headers that lack what a SEG must copy
            logger.warning(f"{series.folder}: cannot write a DICOM SEG ({type(e).__name__}: {e}).")
    top = sources[int(row["top_slice"])] if slice_axis == 2 else None
    try:
        write_atomic(sr_path, build_series_structured_report(sources, row, result, top).save_as)
        written.append(sr_path)
    except Exception as e:
        logger.warning(f"{series.folder}: cannot write a DICOM SR ({type(e).__name__}: {e}).")
    return written
