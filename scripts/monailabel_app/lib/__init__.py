# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""The SAGAN MONAI Label app's tasks, transforms and datastore."""
