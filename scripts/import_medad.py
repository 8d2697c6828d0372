# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Turn a downloaded data set into the Med-AD layout (``OUT/images`` + ``OUT/data.json``) for the SAGAN bundle.

``python scripts/import_medad.py {rsna,vindr,lag,generic} --help`` explains each source and option; the work is
done by :mod:`bundle.importers`.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bundle.importers import ImporterError, main  # noqa: E402

if __name__ == "__main__":
    try:
        main()
    except ImporterError as e:
        sys.exit(f"error: {e}")
