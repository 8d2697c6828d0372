# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Importing MONAI Label 0.8.5 modules without torchvision.

``monailabel.transform.post`` (imported by ``monailabel.tasks.infer.bundle``) imports ``make_grid`` and
``save_image`` from ``torchvision.utils`` at module level, for image-dumping debug transforms this app never uses.
PyPI's torchvision wheels for Linux are CUDA builds (their ops need libtorch_cuda and do not load beside the CPU
torch 2.13), so the MONAI Label environment has no torchvision. :func:`placeholder_torchvision` lets such an import
succeed: placeholder modules exist only while the ``with`` block runs, so that later ``optional_import`` calls (MONAI)
still find no torchvision; calling a placeholder function raises a clear error.
"""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator

__all__ = ["placeholder_torchvision"]


def _missing(*args, **kwargs):
    raise RuntimeError(
        "torchvision is not installed in the MONAI Label environment (PyPI has no CPU build for torch 2.13); "
        "the SAGAN app does not use it."
    )


@contextlib.contextmanager
def placeholder_torchvision() -> Iterator[None]:
    """Within the block, ``import torchvision.utils`` gives placeholders when torchvision cannot be imported."""
    try:
        import torchvision.utils  # noqa: F401
    except Exception:  # not installed, or a CUDA build that fails to load its ops (RuntimeError)
        pass
    else:
        yield
        return
    for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:  # a failed import's leftovers
        del sys.modules[name]
    package, utils = types.ModuleType("torchvision"), types.ModuleType("torchvision.utils")
    utils.make_grid = utils.save_image = _missing
    package.utils = utils
    sys.modules.update({"torchvision": package, "torchvision.utils": utils})
    try:
        yield
    finally:
        for name in ("torchvision", "torchvision.utils"):
            sys.modules.pop(name, None)
