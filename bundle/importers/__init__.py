# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Importers that turn downloaded data sets into the Med-AD layout read by :func:`bundle.data.load_medad_datalist`.

``OUT/images/<file>.png`` plus ``OUT/data.json`` with ``train/0`` (T_n, known normals), ``train/unlabeled/{0,1}``
(the pools T_u is drawn from, or T_u itself), ``val/{0,1}`` and ``test/{0,1}``; names are relative to
``OUT/images``. ``OUT/labels.csv`` lists every image with its split, label, patient and source file, and
``OUT/import.json`` records the settings of the import.

Sources: the RSNA Pneumonia Detection Challenge (DICOM + ``stage_2_detailed_class_info.csv``), VinDr-CXR (DICOM +
``train.csv``), LAG (class folders of fundus JPEGs), and a generic source (folders or CSVs of the user's own splits).
The default split sizes are those of the paper's Table 1 (the Med-AD benchmark repartition): T_n, the unlabeled
pools and the test set; a labelled ``val`` set for checkpoint selection is carved out of the unlabeled pools (RSNA,
VinDr-CXR) or out of the test allocation (LAG, whose abnormal images the paper uses up: 900 in T_u at anomaly
ratio 0.6 plus 811 in test).

Every image is read with :func:`bundle.transforms.io.load_grayscale`, the reader of the bundle itself (rescale
slope/intercept, MONOCHROME1 inverted so that bright = dense, 12/16-bit min-max scaled, colour to grey), shrunk to
``size`` pixels on its short side and written as an 8-bit grey PNG: a DICOM given to the trained bundle at
inference is therefore read exactly as its training images were (up to the 8-bit rounding and the resize). The draw
is seeded; patients never straddle two splits where the source gives patient IDs.

The package: :mod:`.core` (records, results, errors, CSV and folder helpers), :mod:`.conversion` (DICOM checks and
image conversion), one reader per source (:mod:`.rsna`, :mod:`.vindr`, :mod:`.lag`, :mod:`.generic`),
:mod:`.splits` (the paper's sizes and the seeded draw), :mod:`.workspace` (staging and publishing the output folder)
and :mod:`.drivers` (:func:`import_drawn`, :func:`import_fixed`). The command line is ``scripts/import_medad.py``.
"""

from .conversion import check_dicom, convert_image
from .core import ImporterError, ImportResult, Record
from .drivers import import_drawn, import_fixed, summary
from .generic import read_generic
from .lag import read_lag
from .rsna import read_rsna
from .splits import DEFAULT_VAL_FROM, DEFAULT_VAL_SIZE, PAPER_SIZES
from .vindr import read_vindr

__all__ = [
    "ImporterError",
    "Record",
    "ImportResult",
    "PAPER_SIZES",
    "DEFAULT_VAL_SIZE",
    "DEFAULT_VAL_FROM",
    "read_rsna",
    "read_vindr",
    "read_lag",
    "read_generic",
    "check_dicom",
    "convert_image",
    "import_drawn",
    "import_fixed",
    "summary",
]
