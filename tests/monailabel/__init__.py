# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
