# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Test-only patch, active only with ``SAGAN_FAULT_SLOW_SAVE=<seconds>`` and this folder on ``PYTHONPATH``: every
``torch.save`` to an open file announces itself on stderr (``FAULT_SAVE_BEGIN <name>`` / ``FAULT_SAVE_END <name>``)
and spreads its bytes over about that many seconds, so that ``scripts/fault_suite.py`` can land a kill -9 inside a
checkpoint write. Python imports ``sitecustomize`` at start-up; nothing changes without the variable."""

import os

if os.environ.get("SAGAN_FAULT_SLOW_SAVE"):
    import io
    import sys
    import time

    import torch

    _seconds = float(os.environ["SAGAN_FAULT_SLOW_SAVE"])
    _real_save = torch.save

    def _slow_save(obj, f, *args, **kwargs):
        if not hasattr(f, "write"):
            return _real_save(obj, f, *args, **kwargs)
        name = getattr(f, "name", "?")
        buffer = io.BytesIO()
        _real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        print(f"FAULT_SAVE_BEGIN {name} {len(data)}", file=sys.stderr, flush=True)
        chunks = 20
        step = max(1, -(-len(data) // chunks))
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            time.sleep(_seconds / chunks)
        print(f"FAULT_SAVE_END {name}", file=sys.stderr, flush=True)

    torch.save = _slow_save
