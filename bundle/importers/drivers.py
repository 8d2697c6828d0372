# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The two kinds of import: :func:`import_drawn` draws the splits from a labelled source (RSNA, VinDr-CXR, LAG),
:func:`import_fixed` takes the splits the user gave (generic); both convert and publish through a
:class:`~bundle.importers.workspace.Workspace` and return an :class:`~bundle.importers.core.ImportResult`."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence

import numpy as np

from .conversion import Converter
from .core import SOURCE_NAMES, ImporterError, ImportResult, Record, handle_bad_file
from .splits import CHUNK, check_patients, datalist, draw, fits, label_rows, patient_groups, tu_sizes
from .workspace import Workspace

__all__ = ["import_drawn", "import_fixed", "summary"]

# below this many images, conversion stays in this process: each worker process needs seconds to start
_MIN_IMAGES_FOR_WORKERS = 500


def import_drawn(
    source: str,
    records: list[Record],
    out: str,
    targets: dict[tuple[str, int], int | None],
    seed: int = 0,
    size: int = 256,
    on_bad_file: str = "error",
    modalities: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    scale_to_fit: bool = False,
    unlabeled: str = "pool",
    unlabeled_size: int | None = None,
    anomaly_ratio: float = 0.6,
    inputs: Sequence[str] = (),
    notes: Sequence[str] = (),
    settings: dict | None = None,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Draw the Med-AD splits from labelled ``records`` and write them to ``out``.

    Args:
        targets: images per (split, label) for ("test", 0|1), ("val", 0|1), ("train", 0), ("unlabeled", 0|1);
            None takes every image left. Patients are drawn in a ``seed``ed order and placed whole.
        scale_to_fit: when the source has too few images for the targets, scale every target by the same factor
            instead of refusing.
        unlabeled: "pool" writes the unlabeled pools (the bundle draws T_u at training with its anomaly ratio);
            "tu" writes T_u itself: ``unlabeled_size`` (default |T_n|) images at ``anomaly_ratio``.

    Raises:
        ImporterError: too few images (with the counts), a bad file with ``on_bad_file="error"``, a non-empty
            ``out`` without ``overwrite``.
    """
    if unlabeled not in ("pool", "tu"):
        raise ValueError(f"unlabeled must be 'pool' or 'tu', got {unlabeled!r}.")
    if not 0.0 <= anomaly_ratio <= 1.0:
        raise ImporterError(f"--anomaly-ratio must be in [0, 1], got {anomaly_ratio}.")
    for key, t in targets.items():
        if t is not None and t < 0:
            raise ImporterError(f"the size of {key[0]}/{key[1]} is negative ({t}).")
    notes = list(notes)
    available = Counter(r.label for r in records)
    needed = Counter()
    for (_, label), t in targets.items():
        needed[label] += t or 0
    factor = min([1.0] + [available[lab] / needed[lab] for lab in (0, 1) if needed[lab]])
    if factor < 1.0:
        parts = {lab: ", ".join(f"{s} {t}" for (s, lb), t in targets.items() if lb == lab and t) for lab in (0, 1)}
        counts = (
            f"{SOURCE_NAMES.get(source, source)} has {available[0]} normal and {available[1]} abnormal images; "
            f"the sizes need {needed[0]} normal ({parts[0]}) and {needed[1]} abnormal ({parts[1]})"
        )
        if not scale_to_fit:
            raise ImporterError(f"{inputs[0] if inputs else source}: {counts}. Lower the sizes or pass --scale-to-fit.")
        # a size that was not 0 keeps at least one image (val and test need both classes)
        targets = {k: (max(1, math.floor(t * factor)) if t else t) for k, t in targets.items()}
        if unlabeled_size is not None:
            unlabeled_size = math.floor(unlabeled_size * factor)
        notes.append(f"{counts}: every size scaled by {factor:.4f} (--scale-to-fit).")
    tu_size = targets[("train", 0)] if unlabeled_size is None else unlabeled_size
    tu_normal, tu_abnormal = tu_sizes(tu_size, anomaly_ratio)
    pools = {lab: targets.get(("unlabeled", lab)) for lab in (0, 1)}
    short = [
        (lab, n, pools[lab])
        for lab, n in ((0, tu_normal), (1, tu_abnormal))
        if pools[lab] is not None and n > pools[lab]
    ]
    if short:
        lines = "; ".join(f"unlabeled/{lab} has {p} but {n} are needed" for lab, n, p in short)
        message = f"T_u of {tu_size} images at anomaly ratio {anomaly_ratio}: {lines}"
        if unlabeled == "tu":
            raise ImporterError(f"{message}. Lower --unlabeled-size or change the pool sizes.")
        notes.append(f"warning: {message}; train with a smaller --unlabeled_size or another --anomaly_ratio.")
    workers = workers if len(records) >= _MIN_IMAGES_FOR_WORKERS else 1
    with Workspace(out, inputs, overwrite) as ws, Converter(ws.path, size, modalities, workers) as converter:
        log(f"importing {SOURCE_NAMES.get(source, source)}: {len(records)} candidate images, seed {seed}")
        placed, skipped, unused = draw(records, targets, seed, converter, on_bad_file, ws.discard, log)
        missing = [(k, t, len(placed[k])) for k, t in targets.items() if t is not None and len(placed[k]) < t]
        if missing:
            lines = ", ".join(f"{s}/{lab}: {got} of {t}" for (s, lab), t, got in missing)
            raise ImporterError(
                f"{inputs[0] if inputs else source}: too few usable images after {len(skipped)} bad file(s) were "
                f"skipped ({lines}; the source has {available[0]} normal and {available[1]} abnormal). Lower the sizes "
                "(--unlabeled-normal all / --unlabeled-abnormal all take what is left for the pools)."
            )
        if unlabeled == "tu":
            rng = np.random.default_rng([seed, 1])
            for lab, n in ((0, tu_normal), (1, tu_abnormal)):
                pool = placed[("unlabeled", lab)]
                keep = set(rng.choice(len(pool), n, replace=False).tolist())
                ws.discard([r for i, r in enumerate(pool) if i not in keep])
                unused += len(pool) - n
                placed[("unlabeled", lab)] = [r for i, r in enumerate(pool) if i in keep]
            notes.append(
                f"train/unlabeled holds T_u itself ({tu_normal} normal + {tu_abnormal} abnormal); train with "
                f"--anomaly_ratio {anomaly_ratio} --unlabeled_size {tu_size}."
            )
        else:
            notes.append(
                f"train/unlabeled holds the pools; at training T_u = {tu_size} images at --anomaly_ratio "
                f"{anomaly_ratio} ({tu_normal} normal + {tu_abnormal} abnormal) is drawn from them."
            )
        check_patients(placed)
        info = {"source": source, "seed": seed, "image_size": size, "unlabeled": unlabeled}
        info.update(settings or {})
        info.update({"targets": {f"{s}/{lab}": t for (s, lab), t in targets.items()}, "skipped": skipped})
        info["counts"] = {f"{s}/{lab}": len(v) for (s, lab), v in placed.items()}
        ws.publish(datalist(placed), label_rows(placed, set()), info)
    result = ImportResult(ws.out, placed, skipped, unused, notes)
    log(summary(result))
    return result


def import_fixed(
    records: list[Record],
    out: str,
    val_size: int = 0,
    seed: int = 0,
    size: int = 256,
    on_bad_file: str = "error",
    modalities: Sequence[str] | None = None,
    workers: int = 1,
    overwrite: bool = False,
    inputs: Sequence[str] = (),
    notes: Sequence[str] = (),
    settings: dict | None = None,
    log: Callable[[str], None] = print,
) -> ImportResult:
    """Write records whose split the user gave (``Record.split``); when there is no val split, ``val_size`` normal
    + ``val_size`` abnormal test images are moved to val (whole patients, seeded).

    Raises:
        ImporterError: a patient in two splits, no known normals, too few test images for ``val_size``, a bad file
            with ``on_bad_file="error"``, a non-empty ``out`` without ``overwrite``.
    """
    notes = list(notes)
    if not any(r.split == "train" for r in records):
        raise ImporterError("no known normal images (train/0 would be empty).")
    unknown = {r.name for r in records if r.label is None}
    splits: dict[tuple[str, int | None], list[Record]] = defaultdict(list)
    for r in records:
        splits[(r.split, r.label if r.label is not None else 0)].append(r)
    check_patients(splits)
    has_val = bool(splits.get(("val", 0)) or splits.get(("val", 1)))
    has_test = bool(splits.get(("test", 0)) or splits.get(("test", 1)))
    if not has_val and has_test and val_size > 0:
        test = splits.pop(("test", 0), []) + splits.pop(("test", 1), [])
        counts = Counter(r.label for r in test)
        if counts[0] < val_size or counts[1] < val_size:
            raise ImporterError(
                f"{inputs[-1] if inputs else 'labelled'}: no val split given and the test split has {counts[0]} normal "
                f"and {counts[1]} abnormal images; --val-size {val_size} takes {val_size} of each (lower it)."
            )
        targets = {("val", 0): val_size, ("val", 1): val_size, ("test", 0): None, ("test", 1): None}
        # SPLITS offers a patient to test first: draw val by giving test no room until val is full
        order = patient_groups(test, seed)
        filled: Counter = Counter()
        for group in order:
            c = Counter(r.label for r in group)
            split = "val" if fits(c, "val", filled, targets) else "test"
            for r in group:
                splits[(split, r.label)].append(r)
                filled[(split, r.label)] += 1
        if filled[("val", 0)] < val_size or filled[("val", 1)] < val_size:
            raise ImporterError(f"could not draw {val_size} + {val_size} val images from the test split's patients.")
        check_patients(splits)
        notes.append(f"no val split given: {val_size} normal + {val_size} abnormal test images moved to val.")
    elif not has_val:
        notes.append("no val split: training needs one to choose its checkpoint (give val/0, val/1 or a test split).")
    skipped: list[tuple[str, str]] = []
    workers = workers if len(records) >= _MIN_IMAGES_FOR_WORKERS else 1
    with Workspace(out, inputs, overwrite) as ws, Converter(ws.path, size, modalities, workers) as converter:
        every = [r for rs in splits.values() for r in rs]
        log(f"importing {len(every)} images")
        problems = []
        for start in range(0, len(every), CHUNK * 4):
            problems += converter(every[start : start + CHUNK * 4])
            log(f"  {len(problems)} of {len(every)} images read")
        bad = set()
        for r, problem in zip(every, problems):
            if problem is not None:
                handle_bad_file(r, problem, on_bad_file, skipped)
                bad.add(r.name)
        splits = {k: [r for r in v if r.name not in bad] for k, v in splits.items()}
        if not splits.get(("train", 0)):
            raise ImporterError("no readable known normal image left (train/0 would be empty).")
        info = {"source": "generic", "seed": seed, "image_size": size, "val_size": val_size}
        info.update(settings or {})
        info.update({"skipped": skipped, "counts": {f"{s}/{lab}": len(v) for (s, lab), v in sorted(splits.items())}})
        info["unlabeled_labels"] = "unknown" if unknown else "known"
        ws.publish(datalist(splits), label_rows(splits, unknown), info)
    result = ImportResult(ws.out, dict(splits), skipped, 0, notes)
    log(summary(result))
    return result


def summary(result: ImportResult) -> str:
    """The printed summary: images per split and label, skipped files, notes."""
    rows = [("train/0 (T_n)", ("train", 0)), ("train/unlabeled/0", ("unlabeled", 0))]
    rows += [("train/unlabeled/1", ("unlabeled", 1)), ("val/0", ("val", 0)), ("val/1", ("val", 1))]
    rows += [("test/0", ("test", 0)), ("test/1", ("test", 1))]
    lines = [f"wrote {result.out}/data.json and images/:"]
    lines += [f"  {name:<20}{len(result.splits.get(key, [])):>7}" for name, key in rows]
    lines.append(f"  {'total':<20}{sum(len(v) for v in result.splits.values()):>7}")
    if result.unused:
        lines.append(f"  {result.unused} images of the source not needed by the sizes (not written)")
    lines.append(f"  {len(result.skipped)} bad files skipped" + (":" if result.skipped else ""))
    for path, problem in result.skipped[:20]:
        lines.append(f"    {path}: {problem}")
    if len(result.skipped) > 20:
        lines.append(f"    ... and {len(result.skipped) - 20} more (all listed in import.json)")
    lines += [f"note: {n}" for n in result.notes]
    return "\n".join(lines)
