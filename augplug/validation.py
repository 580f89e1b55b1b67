"""The validation stream: a cycling iterator over the user's validation loader.

Batches may be ``(inputs, targets, ...)`` tuples/lists or dicts with an input key (``"input"``,
``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"``, ``"x"``) and a target key (``"target"``,
``"targets"``, ``"label"``, ``"labels"``, ``"y"``). The stream runs on augplug's private RNG, records
where it is in the current pass, and can be restored to that exact position after a restart.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Tuple

import torch

from .errors import ConfigurationError, EmptyValidationError, ShapeError
from .rng import PrivateRNG

__all__ = ["split_batch", "ValidationStream", "CachedValidationStream"]

_INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


def split_batch(batch: Any) -> Tuple[Any, torch.Tensor]:
    """Return ``(inputs, targets)`` from a validation batch."""
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise ShapeError(f"validation batch dict has keys {sorted(batch)}; expected one of {_INPUT_KEYS} "
                             f"and one of {_TARGET_KEYS}",
                             "rename the keys or wrap the loader to yield (inputs, targets)")
        return x, y
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ShapeError(f"validation batch of type {type(batch).__name__} is not (inputs, targets)",
                     "make the validation loader yield (inputs, targets) tuples or dicts")


class ValidationStream:
    """Cycles over ``loader`` forever; ``next()`` returns ``(inputs, targets)``."""

    def __init__(self, loader: Iterable, rng: PrivateRNG):
        if loader is None:
            raise EmptyValidationError("no validation loader was given",
                                       "pass a DataLoader over a small clean labelled set as val_loader")
        self.loader = loader
        self.rng = rng
        self._it = None
        self.pass_rng_state: Optional[torch.Tensor] = None  # private RNG state when this pass began
        self.consumed = 0  # batches taken in this pass

    def _start_pass(self) -> None:
        self.pass_rng_state = self.rng.state.clone()
        self.consumed = 0
        with self.rng:
            self._it = iter(self.loader)

    def next(self) -> Tuple[Any, torch.Tensor]:
        if self._it is None:
            self._start_pass()
        for attempt in range(2):
            with self.rng:
                batch = next(self._it, None)
            if batch is not None:
                self.consumed += 1
                return split_batch(batch)
            if attempt == 0 and self.consumed == 0:
                break
            self._start_pass()
        raise EmptyValidationError("the validation loader yields no batches",
                                   "pass a loader over at least one clean labelled sample (check drop_last and the split)")

    def state_dict(self) -> dict:
        return {"pass_rng_state": self.pass_rng_state, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        """Re-open the pass that was running and skip the batches already taken."""
        if state.get("cached"):
            raise ConfigurationError("this state was saved with cache_validation=True",
                                     "build the refiner with cache_validation=True before loading")
        self._it = None
        self.pass_rng_state = state.get("pass_rng_state")
        self.consumed = 0
        if self.pass_rng_state is None:
            return
        saved = self.rng.state
        self.rng.state = self.pass_rng_state.clone()
        with self.rng:
            self._it = iter(self.loader)
            for _ in range(int(state["consumed"])):
                next(self._it)
        self.rng.state = saved
        self.consumed = int(state["consumed"])


class CachedValidationStream(ValidationStream):
    """A :class:`ValidationStream` that reads the loader once and then cycles over the batches it kept.

    ``prepare(inputs, targets)`` turns each raw batch into what the consumer needs (on the refiner:
    inputs on the model's device and checked soft targets); the consumer sets it before reading.
    The first pass (and so any shuffling or random transform in the loader) is drawn once from the
    private RNG; later passes repeat it in the same order. ``state_dict`` keeps the RNG state the
    pass was drawn from and the position, so a restored stream rebuilds the same batches (on its
    next read) and continues where it was.
    """

    def __init__(self, loader: Iterable, rng: PrivateRNG):
        super().__init__(loader, rng)
        self.prepare = None
        self._batches: Optional[list] = None
        self._pos = 0
        self._fill_rng_state: Optional[torch.Tensor] = None  # private RNG state the cached pass was drawn from

    def _fill(self) -> None:
        if self.prepare is None:
            raise RuntimeError("CachedValidationStream.prepare must be set before the first batch is read")
        restoring = self._fill_rng_state is not None
        saved = self.rng.state
        if restoring:  # rebuild the pass a saved state refers to, leaving the RNG where it is now
            self.rng.state = self._fill_rng_state.clone()
        fill_state = self.rng.state.clone()
        try:
            with self.rng:
                raw = [split_batch(b) for b in self.loader]
            batches = [self.prepare(x, y) for x, y in raw]
        finally:
            if restoring:
                self.rng.state = saved
        if not batches:
            raise EmptyValidationError("the validation loader yields no batches",
                                       "pass a loader over at least one clean labelled sample (check drop_last and the split)")
        self._batches, self._fill_rng_state = batches, fill_state
        self._pos %= len(batches)

    def next(self) -> Tuple[Any, torch.Tensor]:
        if self._batches is None:
            self._fill()
        batch = self._batches[self._pos]
        self._pos = (self._pos + 1) % len(self._batches)
        return batch

    def pass_length(self) -> int:
        """Batches per pass (reads the loader if it was not read yet)."""
        if self._batches is None:
            self._fill()
        return len(self._batches)

    def state_dict(self) -> dict:
        state = None if self._fill_rng_state is None else self._fill_rng_state.clone()
        return {"cached": True, "fill_rng_state": state, "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        if not state.get("cached"):
            raise ConfigurationError("this state was saved without cache_validation",
                                     "build the refiner with the same cache_validation setting before loading")
        fill = state.get("fill_rng_state")
        same_pass = (self._batches is not None and fill is not None and self._fill_rng_state is not None
                     and torch.equal(fill, self._fill_rng_state))
        if not same_pass:  # rebuilt lazily, on the next read
            self._batches = None
            self._fill_rng_state = None if fill is None else fill.clone()
        self._pos = int(state["pos"])
