# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Command line of the Med-AD importers: turn a downloaded data set into the Med-AD layout (``OUT/images`` +
``OUT/data.json``) for the SAGAN bundle.

``python scripts/import_medad.py {rsna,vindr,lag,generic} --help`` explains each source and option; the work is
done by :mod:`bundle.importers`. :func:`main` takes the arguments as a list, for use from Python and tests.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.importers import (  # noqa: E402
    DEFAULT_VAL_FROM,
    DEFAULT_VAL_SIZE,
    PAPER_SIZES,
    ImporterError,
    ImportResult,
    import_drawn,
    import_fixed,
    read_generic,
    read_lag,
    read_rsna,
    read_vindr,
)

CHEST_MODALITIES = ("CR", "DX")  # the default --modality of the chest X-ray sources

_DICOM_HELP = (
    "Images are written as 8-bit grey PNG (--size px on the short side, aspect kept) through the bundle's own "
    "reader bundle.transforms.io.load_grayscale: rescale slope/intercept, MONOCHROME1 inverted (bright = dense), "
    "12/16-bit min-max scaled, as the Med-AD preprocessing does, with no VOI LUT/windowing, so a DICOM given to the "
    "trained bundle reads like its training images. Why convert: the bundle decodes every training image at "
    "start-up (a 1024x1024 DICOM costs about 3x a 256 px PNG to decode and resize; VinDr-CXR DICOMs are about "
    "2-3k px and 200 GB in all); 256 px PNGs are ~40x smaller; at the 64x64 model input 8 bits and 256 px lose "
    "nothing the model sees; and the import happens once, recorded in import.json and labels.csv."
)


def _size_arg(value: str) -> int | str:
    if value == "all":
        return value
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {n}")
    return n


def _count_arg(value: str) -> int:
    n = _size_arg(value)
    if n == "all":
        raise argparse.ArgumentTypeError("'all' is only accepted for the unlabeled pools")
    return n


def _modality_arg(value: str) -> tuple[str, ...] | None:
    return None if value.lower() == "any" else tuple(m.strip().upper() for m in value.split(",") if m.strip())


def _add_output_options(parser: argparse.ArgumentParser, modality_default: str) -> None:
    g = parser.add_argument_group("output and reading")
    g.add_argument(
        "--out", required=True, help="output folder (new or empty): images/, data.json, labels.csv, import.json"
    )
    g.add_argument(
        "--overwrite", action="store_true", help="replace images/, data.json, labels.csv, import.json in --out"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the draw; the same seed and inputs give the same files")
    g.add_argument(
        "--size",
        type=_count_arg,
        default=256,
        help="short side of the written PNGs in pixels, never enlarged; 0 keeps the "
        "native size (default 256; the model input is 64x64)",
    )
    g.add_argument(
        "--on-bad-file",
        choices=("error", "skip"),
        default="error",
        help="a bad file (missing, unreadable, no pixel data, non-image DICOM, wrong modality, constant, not 2D): "
        "stop naming it (error, default) or leave it out, counted and listed in the summary and import.json (skip)",
    )
    g.add_argument(
        "--modality",
        type=_modality_arg,
        default=_modality_arg(modality_default),
        help=f"DICOM Modality values accepted, comma-separated, or 'any' (default {modality_default})",
    )
    g.add_argument(
        "--workers",
        type=_count_arg,
        default=min(8, os.cpu_count() or 1),
        help="decoding processes (default min(8, CPUs); 1 below 500 images, as each process needs seconds to "
        "start); the result does not depend on it",
    )


def _add_size_options(parser: argparse.ArgumentParser, source: str) -> None:
    p = PAPER_SIZES[source]
    g = parser.add_argument_group(
        "split sizes (defaults: the paper's Table 1 / the Med-AD repartition)",
        f"T_n {p['train_normal']}; unlabeled pools {p['pool_normal']} normal + {p['pool_abnormal']} abnormal; test "
        f"{p['test_normal']} + {p['test_abnormal']}; val {DEFAULT_VAL_SIZE} + {DEFAULT_VAL_SIZE} taken from the "
        f"{DEFAULT_VAL_FROM[source]} allocation (--val-from). Patients are drawn in a seeded order and placed whole "
        "into test, then val, then T_n, then the pools.",
    )
    g.add_argument(
        "--train-normal", type=_count_arg, help=f"T_n, known normal training images (default {p['train_normal']})"
    )
    g.add_argument("--unlabeled-normal", type=_size_arg, help="normal images in the unlabeled pool, or 'all' left")
    g.add_argument("--unlabeled-abnormal", type=_size_arg, help="abnormal images in the unlabeled pool, or 'all' left")
    g.add_argument(
        "--test-size", type=_count_arg, help="test images per class (sets both --test-normal and --test-abnormal)"
    )
    g.add_argument("--test-normal", type=_count_arg)
    g.add_argument("--test-abnormal", type=_count_arg)
    g.add_argument("--val-size", type=_count_arg, help=f"val images per class (default {DEFAULT_VAL_SIZE})")
    g.add_argument("--val-normal", type=_count_arg)
    g.add_argument("--val-abnormal", type=_count_arg)
    g.add_argument(
        "--val-from",
        choices=("unlabeled", "test"),
        default=DEFAULT_VAL_FROM[source],
        help="which paper allocation (unless its size is given) shrinks by the val images; default "
        f"{DEFAULT_VAL_FROM[source]}"
        + (
            ": LAG's 1711 abnormal images are all used by the paper (900 in T_u at ratio 0.6 + 811 test), so "
            "taking val from the pool would leave T_u short"
            if source == "lag"
            else ""
        ),
    )
    g.add_argument(
        "--scale-to-fit",
        action="store_true",
        help="when the source has fewer images than the sizes need, scale every size by the same factor "
        "(default: refuse, giving the counts)",
    )
    t = parser.add_argument_group("unlabeled set T_u")
    t.add_argument(
        "--unlabeled",
        choices=("pool", "tu"),
        default="pool",
        help="pool (default, as Med-AD): train/unlabeled holds the pools and the bundle draws T_u at training "
        "(--anomaly_ratio, --unlabeled_size of configs/train.json); tu: it holds T_u itself",
    )
    t.add_argument("--unlabeled-size", type=_count_arg, help="|T_u| (default |T_n|, as the paper)")
    t.add_argument(
        "--anomaly-ratio",
        type=float,
        default=0.6,
        help="abnormal fraction of T_u (default 0.6, the paper's); checked against the pools, applied with "
        "--unlabeled tu",
    )


def _split_targets(source: str, args: argparse.Namespace) -> dict[tuple[str, int], int | None]:
    p = PAPER_SIZES[source]

    def pick(*values: int | None) -> int:
        return next(v for v in values if v is not None)

    val = {
        0: pick(args.val_normal, args.val_size, DEFAULT_VAL_SIZE),
        1: pick(args.val_abnormal, args.val_size, DEFAULT_VAL_SIZE),
    }
    from_test = args.val_from == "test"
    test = {
        0: pick(args.test_normal, args.test_size, p["test_normal"] - (val[0] if from_test else 0)),
        1: pick(args.test_abnormal, args.test_size, p["test_abnormal"] - (val[1] if from_test else 0)),
    }
    defaults = {
        0: p["pool_normal"] - (0 if from_test else val[0]),
        1: p["pool_abnormal"] - (0 if from_test else val[1]),
    }
    pools: dict[int, int | None] = {}
    for lab, given in ((0, args.unlabeled_normal), (1, args.unlabeled_abnormal)):
        if given == "all":
            pools[lab] = None
        elif given is not None:
            pools[lab] = given
        elif defaults[lab] < 0:
            raise ImporterError(
                f"--val-size {val[lab]} is larger than the paper's unlabeled pool; give the pool sizes."
            )
        else:
            pools[lab] = defaults[lab]
    return {
        ("test", 0): test[0],
        ("test", 1): test[1],
        ("val", 0): val[0],
        ("val", 1): val[1],
        ("train", 0): pick(args.train_normal, p["train_normal"]),
        ("unlabeled", 0): pools[0],
        ("unlabeled", 1): pools[1],
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="import_medad.py",
        description="Turn a downloaded data set into the Med-AD layout (OUT/images + OUT/data.json) that the SAGAN "
        "bundle trains on (--dataset_dir OUT). " + _DICOM_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="source", required=True, metavar="{rsna,vindr,lag,generic}")

    rsna = sub.add_parser(
        "rsna",
        help="RSNA Pneumonia Detection Challenge (Kaggle): DICOMs + stage_2_detailed_class_info.csv",
        description="RSNA Pneumonia Detection Challenge. Labels from stage_2_detailed_class_info.csv (patientId,class, "
        "one row per box: deduplicated): Normal -> 0, Lung Opacity -> 1. The Med-AD repartition (8851 normal + 6012 "
        "lung opacity) leaves 'No Lung Opacity / Not Normal' out; --not-normal abnormal counts it abnormal. One image "
        "per patient (patientId). " + _DICOM_HELP,
    )
    rsna.add_argument("--images", required=True, help="the stage_2_train_images folder (<patientId>.dcm)")
    rsna.add_argument("--labels", required=True, help="stage_2_detailed_class_info.csv")
    rsna.add_argument(
        "--not-normal",
        choices=("exclude", "abnormal"),
        default="exclude",
        help="'No Lung Opacity / Not Normal' images: left out (default, Med-AD) or abnormal",
    )
    _add_output_options(rsna, ",".join(CHEST_MODALITIES))
    _add_size_options(rsna, "rsna")

    vindr = sub.add_parser(
        "vindr",
        help="VinDr-CXR (Kaggle VinBigData or PhysioNet): DICOMs + train.csv",
        description="VinDr-CXR. Labels from the Kaggle train.csv (image_id,class_name,...,rad_id: one row per reader "
        "finding) or PhysioNet's image_labels_train.csv: an image is normal only if every row of it says 'No "
        "finding'. VinDr-CXR gives no patient IDs: each image is split as its own patient. " + _DICOM_HELP,
    )
    vindr.add_argument("--images", required=True, help="the train folder (<image_id>.dicom)")
    vindr.add_argument("--labels", required=True, help="train.csv (Kaggle) or image_labels_train.csv (PhysioNet)")
    _add_output_options(vindr, ",".join(CHEST_MODALITIES))
    _add_size_options(vindr, "vindr")

    lag = sub.add_parser(
        "lag",
        help="LAG glaucoma database: class folders of fundus JPEGs",
        description="LAG (Li et al., CVPR 2019): fundus JPEGs in class folders, searched recursively; folders named "
        "by --exclude-dir (the ophthalmologists' attention maps) are skipped. No patient IDs: each image is split as "
        "its own patient. Images are written as 8-bit grey PNG (--size px on the short side) through the bundle's "
        "reader load_grayscale: colour becomes grey with the ITU-R 601-2 luma weights, as in the bundle.",
    )
    lag.add_argument("--root", required=True, help="the LAG folder holding the class folders")
    lag.add_argument(
        "--normal-dir", action="append", help="normal class folder under --root (repeatable; default non_glaucoma)"
    )
    lag.add_argument(
        "--abnormal-dir",
        action="append",
        help="abnormal class folder (repeatable; default suspicious_glaucoma and/or glaucoma, whichever exist)",
    )
    lag.add_argument("--exclude-dir", action="append", help="folder names skipped (repeatable; default attention_map)")
    _add_output_options(lag, "any")
    _add_size_options(lag, "lag")

    generic = sub.add_parser(
        "generic",
        help="your own images: known normals, unlabeled images, labelled val/test",
        description="Your own splits, taken as given. Folders are searched recursively for images; CSV paths are "
        "relative to the CSV's folder; an optional patient column (--patient-column) is checked: a patient in two "
        "splits is refused. " + _DICOM_HELP,
    )
    generic.add_argument("--normal", required=True, help="known normal images (T_n): a folder, or a CSV with 'path'")
    generic.add_argument(
        "--unlabeled",
        help="unlabeled images: a folder (labels unknown), a folder with 0/ and 1/ (labels known, "
        "for benchmarks), or a CSV with 'path' and optional 'label'. Unknown labels are listed under "
        "train/unlabeled/0: train with --anomaly_ratio 0",
    )
    generic.add_argument(
        "--labelled",
        help="labelled images: a folder with test/0, test/1 and optional val/0, val/1, or a CSV with "
        "'path','label' (0/1),'split' (val/test)",
    )
    generic.add_argument(
        "--patient-column", default="patient_id", help="CSV column of patient IDs (default patient_id)"
    )
    generic.add_argument(
        "--val-size",
        type=_count_arg,
        default=DEFAULT_VAL_SIZE,
        help=f"when --labelled has no val: move this many normal and abnormal test images (whole patients) to val "
        f"(default {DEFAULT_VAL_SIZE}; 0: no val)",
    )
    _add_output_options(generic, "any")
    return parser


def main(argv: Sequence[str] | None = None, log: Callable[[str], None] = print) -> ImportResult:
    """Command line: ``python scripts/import_medad.py {rsna,vindr,lag,generic} --help``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    common = {
        "out": args.out,
        "seed": args.seed,
        "size": args.size,
        "on_bad_file": args.on_bad_file,
        "modalities": args.modality,
        "workers": max(1, args.workers),
        "overwrite": args.overwrite,
        "log": log,
    }
    settings = {"command": ["import_medad.py"] + list(argv if argv is not None else sys.argv[1:])}
    if args.source == "generic":
        records, notes = read_generic(args.normal, args.unlabeled, args.labelled, args.patient_column)
        inputs = [p for p in (args.normal, args.unlabeled, args.labelled) if p]
        return import_fixed(records, val_size=args.val_size, inputs=inputs, notes=notes, settings=settings, **common)
    if args.source == "rsna":
        records, notes = read_rsna(args.images, args.labels, args.not_normal)
        inputs = [args.images, args.labels]
    elif args.source == "vindr":
        records, notes = read_vindr(args.images, args.labels)
        inputs = [args.images, args.labels]
    else:
        records, notes = read_lag(
            args.root,
            args.normal_dir or ("non_glaucoma",),
            args.abnormal_dir or ("suspicious_glaucoma", "glaucoma"),
            args.exclude_dir or ("attention_map",),
        )
        inputs = [args.root]
    val_from = "the unlabeled pools" if args.val_from == "unlabeled" else "the test allocation"
    notes.append(f"val is taken from {val_from} of the paper's repartition (--val-from).")
    return import_drawn(
        args.source,
        records,
        targets=_split_targets(args.source, args),
        scale_to_fit=args.scale_to_fit,
        unlabeled=args.unlabeled,
        unlabeled_size=args.unlabeled_size,
        anomaly_ratio=args.anomaly_ratio,
        inputs=inputs,
        notes=notes,
        settings=settings,
        **common,
    )


if __name__ == "__main__":
    try:
        main()
    except ImporterError as e:
        sys.exit(f"error: {e}")
