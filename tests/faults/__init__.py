# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Fault tests: bad inputs, bad images skipped without lying, interrupted and failing checkpoint writes, untrusted
checkpoints, determinism (docs/reliability.md; scripts/fault_suite.py runs the long kill -9 loop)."""
