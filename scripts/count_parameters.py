#!/usr/bin/env python
# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Print the generator and critic parameter counts of train.json merged with the given preset files.

python scripts/count_parameters.py                                  # the demo defaults
python scripts/count_parameters.py configs/presets/paper.json       # 44,758,979 / 44,719,040
python scripts/count_parameters.py configs/presets/brainomaly.json  # the Brainomaly baseline generator
"""

from __future__ import annotations

import os
import sys

from monai.bundle import ConfigParser

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(presets: list[str]) -> None:
    parser = ConfigParser()
    parser.read_config(["configs/train.json", *presets])
    for role, key in (("generator", "network_def"), ("critic", "discriminator_def")):
        net = parser.get_parsed_content(key)
        print(f"{role} {type(net).__name__}: {sum(p.numel() for p in net.parameters()):,} parameters")


if __name__ == "__main__":
    main(sys.argv[1:])
