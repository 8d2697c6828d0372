# Copyright (c) the SAGAN bundle authors. Licensed under the Apache License, Version 2.0.
"""Exact resume: a resumed training run continues with the random draws and the batch order of the uninterrupted
run, so that its final state is bitwise the same (CPU, same machine, ``num_workers=0``).

- :class:`ResumablePassSampler` shuffles pass ``p`` over the pairs with the seed ``(seed, p)`` and, when a resumed
  run starts, continues in the middle of the pass its iteration was in (the position follows from the iteration:
  every pass has ``len(dataset) // batch_size`` batches).
- :func:`random_states` / :func:`set_random_states` capture and restore the torch (CPU and CUDA), numpy and Python
  random states and those of the training data set's ``Randomizable`` parts (the donor draw, the FPI transform) as
  plain values and tensors (loadable with ``weights_only=True``); the trainer keeps them in its checkpointed state.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.transforms import Randomizable, Transform

__all__ = ["ResumablePassSampler", "random_states", "set_random_states"]


class ResumablePassSampler(torch.utils.data.Sampler):
    """Indices of ``data_source`` in a new random order at every pass (pass ``p``: ``randperm`` seeded with
    ``(seed, p)``, independent of the global random state). Attach it to the trainer (after the checkpoint loader)
    so that a resumed run starts at the pass and position of its iteration; use it with ``drop_last=True``.

    Args:
        data_source: the training pairs.
        seed: the shuffling seed.
        batch_size: the loader's batch size (a pass is ``len(data_source) // batch_size`` batches).
    """

    def __init__(self, data_source, seed: int = 0, batch_size: int = 1) -> None:
        self.n = len(data_source)
        self.seed = int(seed)
        self.batch_size = int(batch_size)
        self.batches_per_pass = self.n // self.batch_size  # 0: no full batch, which SAGANTrainer refuses
        self.next_pass = 0
        self._skip = 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(
            int(np.random.SeedSequence([self.seed, self.next_pass]).generate_state(1)[0])
        )
        self.next_pass += 1
        order = torch.randperm(self.n, generator=generator).tolist()
        skip, self._skip = self._skip, 0
        return iter(order[skip:])

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._resume)

    def _resume(self, engine: Engine) -> None:
        if self.batches_per_pass:
            self.next_pass, position = divmod(engine.state.iteration, self.batches_per_pass)
            self._skip = position * self.batch_size


def _randomizables(dataset) -> dict[str, Randomizable]:
    """Every ``Randomizable`` reachable from the data set through transforms (attributes, lists, ``Compose``),
    named by its attribute path (e.g. ``dataset.pair_transform.fpi``)."""
    found: dict[str, Randomizable] = {}
    seen: set[int] = set()

    def walk(obj, name: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, Randomizable):
            found[name] = obj
        if isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                if isinstance(item, (Randomizable, Transform, list, tuple)):
                    walk(item, f"{name}.{i}")
            return
        if obj is dataset or isinstance(obj, (Randomizable, Transform)):
            for key, value in vars(obj).items():
                if isinstance(value, (Randomizable, Transform, list, tuple)):
                    walk(value, f"{name}.{key}")

    if dataset is not None:
        walk(dataset, "dataset")
    return found


def _numpy_state(state: tuple) -> dict:
    _, keys, pos, has_gauss, gauss = state
    return {
        "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "gauss": float(gauss),
    }


def _numpy_tuple(state: dict) -> tuple:
    return ("MT19937", state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"], state["gauss"])


def random_states(dataset=None) -> dict:
    """Every random state a training step draws from, as tensors and plain values."""
    version, internal, gauss = random.getstate()
    out = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state(np.random.get_state()),
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "data": {name: _numpy_state(obj.R.get_state()) for name, obj in _randomizables(dataset).items()},
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_random_states(states: dict, dataset=None) -> None:
    """Restores what :func:`random_states` captured."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(_numpy_tuple(states["numpy"]))
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["internal"]), python["gauss"]))
    for name, obj in _randomizables(dataset).items():
        if name in states["data"]:
            obj.R.set_state(_numpy_tuple(states["data"][name]))
    if "cuda" in states and torch.cuda.is_available():  # a run saved with more GPUs than visible here: the first ones
        for device, state in enumerate(states["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)
