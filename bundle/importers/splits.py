# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Drawing the Med-AD splits: the split sizes of the paper's Table 1, the seeded draw that places whole patients
into test, val, T_n and the unlabeled pools, and the ``data.json`` and ``labels.csv`` contents of a draw."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Callable
from itertools import islice

import numpy as np

from .core import ImporterError, Record, handle_bad_file

__all__ = [
    "CHUNK",
    "DEFAULT_VAL_FROM",
    "DEFAULT_VAL_SIZE",
    "PAPER_SIZES",
    "SPLITS",
    "check_patients",
    "datalist",
    "draw",
    "fits",
    "label_rows",
    "patient_groups",
    "split_with_room",
    "tu_sizes",
]

# split sizes of the paper's Table 1: T_n, the unlabeled pools T_u is drawn from, and the test set
PAPER_SIZES: dict[str, dict[str, int]] = {
    "rsna": {
        "train_normal": 3851,
        "pool_normal": 4000,
        "pool_abnormal": 5012,
        "test_normal": 1000,
        "test_abnormal": 1000,
    },
    "vindr": {
        "train_normal": 4000,
        "pool_normal": 5606,
        "pool_abnormal": 3394,
        "test_normal": 1000,
        "test_abnormal": 1000,
    },
    "lag": {"train_normal": 1500, "pool_normal": 832, "pool_abnormal": 900, "test_normal": 811, "test_abnormal": 811},
}
DEFAULT_VAL_SIZE = 100
DEFAULT_VAL_FROM = {"rsna": "unlabeled", "vindr": "unlabeled", "lag": "test"}
SPLITS = ("test", "val", "train", "unlabeled")  # the order in which a drawn patient is offered to the splits
CHUNK = 256  # patients decoded per batch; a constant so that the draw does not depend on --workers


def fits(counts: Counter, split: str, filled: Counter, targets: dict) -> bool:
    """Whether a patient with ``counts`` images per label fits into ``split``, given the images ``filled`` so far."""
    for label, n in counts.items():
        key = (split, label)
        if key not in targets or (targets[key] is not None and filled[key] + n > targets[key]):
            return False
    return True


def split_with_room(counts: Counter, filled: Counter, targets: dict) -> str | None:
    """The first split of :data:`SPLITS` that a patient with ``counts`` images per label fits into (None: none)."""
    return next((s for s in SPLITS if fits(counts, s, filled, targets)), None)


def patient_groups(records: list[Record], seed: int) -> list[list[Record]]:
    """Records grouped by patient (an image without patient is its own group), in an order shuffled by ``seed``."""
    by_patient: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_patient[f"p:{r.patient}" if r.patient else f"f:{r.name}"].append(r)
    keys = sorted(by_patient)
    order = np.random.default_rng(seed).permutation(len(keys))
    return [sorted(by_patient[keys[i]], key=lambda r: r.name) for i in order]


def draw(
    records: list[Record],
    targets: dict[tuple[str, int], int | None],
    seed: int,
    convert: Callable[[list[Record]], list[str | None]],
    on_bad_file: str,
    discard: Callable[[list[Record]], None],
    log: Callable[[str], None],
) -> tuple[dict[tuple[str, int], list[Record]], list[tuple[str, str]], int]:
    """Patients in seeded order, each decoded and then placed whole into the first split (test, val, train,
    unlabeled) with room for all its good images; a target None takes every image left."""
    placed: dict[tuple[str, int], list[Record]] = {k: [] for k in targets}
    filled: Counter = Counter()
    skipped: list[tuple[str, str]] = []
    unused = 0
    groups = iter(patient_groups(records, seed))
    total = sum(t if t is not None else 0 for t in targets.values())
    open_ended = any(t is None for t in targets.values())
    done_batches = 0
    while open_ended or any(filled[k] < t for k, t in targets.items() if t is not None):
        batch = list(islice(groups, CHUNK))
        if not batch:
            break
        # only patients that may still fit are decoded (the check uses the fill at the start of the batch)
        wanted = [g for g in batch if split_with_room(Counter(r.label for r in g), filled, targets) is not None]
        unused += sum(len(g) for g in batch) - sum(len(g) for g in wanted)
        problems = iter(convert([r for g in wanted for r in g]))
        for group in wanted:
            good = []
            for r in group:
                problem = next(problems)
                if problem is None:
                    good.append(r)
                else:
                    handle_bad_file(r, problem, on_bad_file, skipped)
            split = split_with_room(Counter(r.label for r in good), filled, targets) if good else None
            if split is None:
                discard(good)
                unused += len(good)
                continue
            for r in good:
                placed[(split, r.label)].append(r)
                filled[(split, r.label)] += 1
        done_batches += 1
        if done_batches % 8 == 0:
            log(f"  {sum(filled.values())} images placed" + (f" of {total}" if not open_ended else ""))
    unused += sum(len(g) for g in groups)
    return placed, skipped, unused


def datalist(splits: dict[tuple[str, int | None], list[Record]]) -> dict:
    """The content of ``data.json``: the sorted image names of each split and label."""

    def names(key: tuple[str, int]) -> list[str]:
        return sorted(r.name for r in splits.get(key, []))

    data = {
        "train": {"0": names(("train", 0)), "unlabeled": {"0": names(("unlabeled", 0)), "1": names(("unlabeled", 1))}}
    }
    for split in ("val", "test"):
        if splits.get((split, 0)) or splits.get((split, 1)):
            data[split] = {"0": names((split, 0)), "1": names((split, 1))}
    return data


def label_rows(splits: dict[tuple[str, int | None], list[Record]], unknown: set[str]) -> list[list[str]]:
    """The rows of ``labels.csv`` (file, split, label, patient, source), sorted; images in ``unknown`` get no label."""
    rows = []
    for (split, label), records in splits.items():
        for r in records:
            shown = "" if r.name in unknown else str(label)
            rows.append([r.name, split, shown, r.patient or "", r.source])
    return sorted(rows)


def check_patients(splits: dict[tuple[str, int | None], list[Record]]) -> None:
    """Refuses splits in which a patient has images in more than one split."""
    where: dict[str, set[str]] = defaultdict(set)
    for (split, _), records in splits.items():
        for r in records:
            if r.patient:
                where[r.patient].add(split)
    straddling = {p: s for p, s in where.items() if len(s) > 1}
    if straddling:
        shown = "; ".join(f"{p}: {', '.join(sorted(s))}" for p, s in sorted(straddling.items())[:10])
        raise ImporterError(f"{len(straddling)} patient(s) have images in more than one split ({shown}).")


def tu_sizes(size: int, ratio: float) -> tuple[int, int]:
    """(normal, abnormal) images of a T_u of ``size`` images at anomaly ratio ``ratio``."""
    n_abnormal = math.floor(ratio * size + 1e-9)  # as bundle.data.select_unlabeled
    return size - n_abnormal, n_abnormal
