# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The MONAI Label app's tests run in ``.venv-monailabel`` (``bash scripts/setup_monailabel.sh``), driven by
``tests/test_monailabel.py`` from the bundle's ``.venv``; the bundle's own pytest run skips this folder."""

try:
    import monailabel  # noqa: F401
except ImportError:
    collect_ignore_glob = ["*.py"]
else:
    from .helpers import bundle_copy, demo_images, png_image, tiny_model  # noqa: F401  (fixtures)
