"""The validation stream: a cycling iterator over the user's validation loader.

Batches may be ``(inputs, targets, ...)`` tuples/lists or dicts with an input key (``"input"``,
``"inputs"``, ``"image"``, ``"images"``, ``"pixel_values"``, ``"x"``) and a target key (``"target"``,
``"targets"``, ``"label"``, ``"labels"``, ``"y"``). The stream runs on augplug's private RNG, records
where it is in the current pass, and can be restored to that exact position after a restart.

A checkpoint's position is loaded by re-opening its pass at once (:meth:`ValidationStream.load_state_dict`,
which restores itself when that fails); a failed refiner call's rollback puts the position back without
reading the loader (:meth:`ValidationStream.restore`), and the pass is re-opened at the next read, so a
rollback cannot fail half-way. A pass is what one ``iter(loader)`` yields: a later pass that yields no
batches (an ``IterableDataset`` whose ``__iter__`` returns one stored generator) is an
:class:`~augplug.errors.EmptyValidationError` that says so, and :meth:`ValidationStream.one_pass` (what
``val_batches="all"`` reads) ends where the pass ends, whatever ``len(loader)`` claims.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Iterable, List, Optional, Tuple

import torch
from torch.utils.data import DataLoader, IterableDataset

from .errors import ConfigurationError, EmptyValidationError, ShapeError
from .rng import PrivateRNG, is_generator_state

__all__ = ["split_batch", "empty_batch", "len_is_exact", "ValidationStream", "CachedValidationStream"]

_INPUT_KEYS = ("input", "inputs", "image", "images", "pixel_values", "x")
_TARGET_KEYS = ("target", "targets", "label", "labels", "y")


#: the end of a loader's pass (a loader may yield None as a batch: that is an error, not the end)
_END = object()


def split_batch(batch: Any) -> Tuple[Any, torch.Tensor]:
    """Return ``(inputs, targets)`` from a validation batch. A single sample (a target that is a
    number or a 0-dim tensor: the loader is a ``Dataset``, not a ``DataLoader`` over it) is an error
    that says so."""
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        y = next((batch[k] for k in _TARGET_KEYS if k in batch), None)
        if x is None or y is None:
            raise ShapeError(f"validation batch dict has keys {sorted(batch)}; expected one of {_INPUT_KEYS} "
                             f"and one of {_TARGET_KEYS}",
                             "rename the keys or wrap the loader to yield (inputs, targets)")
        return x, _batch_targets(y)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], _batch_targets(batch[1])
    if batch is None:
        raise ShapeError("the validation loader yielded None for a batch (a collate_fn that drops bad batches?)",
                         "leave bad samples out of the validation set itself (a Subset without them), so that "
                         "every batch is (inputs, targets)")
    raise ShapeError(f"validation batch of type {type(batch).__name__} is not (inputs, targets)",
                     "make the validation loader yield (inputs, targets) tuples or dicts")


def _batch_targets(y: Any) -> Any:
    if isinstance(y, (int, float)) or (torch.is_tensor(y) and y.dim() == 0):
        raise ShapeError(
            f"the validation loader yields single samples (a target {y!r} with no batch dimension), not batches: "
            "it is probably a Dataset rather than a DataLoader over it",
            "wrap it: val_loader=torch.utils.data.DataLoader(dataset, batch_size=128)")
    return y


def check_batch_rows(x: Any, y: Any) -> None:
    """A :class:`ShapeError` when a validation batch's input tensor and target tensor have different
    numbers of rows (one target per input row)."""
    if torch.is_tensor(x) and torch.is_tensor(y) and x.dim() > 0 and y.dim() > 0 and x.shape[0] != y.shape[0]:
        raise ShapeError(f"a validation batch has {x.shape[0]} inputs but {y.shape[0]} targets",
                         "make the validation loader yield one target per input row")


def _rows(v: Any) -> Optional[int]:
    """The rows of a batch's inputs or targets where they can be told without the model: a tensor's
    first dimension, or that of a mapping's first tensor (a tokenizer's output); None otherwise."""
    if torch.is_tensor(v):
        return int(v.shape[0]) if v.dim() > 0 else None
    if isinstance(v, Mapping):
        return next((int(t.shape[0]) for t in v.values() if torch.is_tensor(t) and t.dim() > 0), None)
    return None


def empty_batch(x: Any, y: Any) -> bool:
    """Whether a validation batch holds no samples: its inputs and targets have 0 rows (one of them
    with rows it cannot tell). Inputs and targets with different numbers of rows are not an empty
    batch but a mismatch (:func:`check_batch_rows`)."""
    rows = [n for n in (_rows(x), _rows(y)) if n is not None]
    return bool(rows) and all(n == 0 for n in rows)


def len_is_exact(loader: Any) -> bool:
    """Whether ``len(loader)`` is taken as the number of batches one pass yields: not for a
    ``DataLoader`` over an ``IterableDataset``, whose length is the dataset's claim (WebDataset's
    ``with_length``, a sharded stream's estimate)."""
    return not (isinstance(loader, DataLoader) and isinstance(loader.dataset, IterableDataset))


def _later_pass_error(got: int, before: int) -> Exception:
    """The error for a pass of the loader (a new ``iter(loader)``) that yields ``got`` batches where an
    earlier pass yielded at least ``before``: the loader does not start over when iterated again."""
    problem = (f"a later pass of the validation loader (a new iter(loader)) yields {got} batch(es), but an earlier "
               f"pass yielded {before}: its __iter__ does not start a new pass (an IterableDataset whose __iter__ "
               "returns one stored generator or iterator ends after its first pass), or its data shrank")
    fix = ("build the dataset so that each iter() starts over: create the generator inside __iter__ "
           "(def __iter__(self): return (sample for sample in ...)), or pass a list of batches or a DataLoader "
           "over a map-style Dataset")
    return EmptyValidationError(problem, fix) if got == 0 else ConfigurationError(problem, fix)


def loader_generators(loader: Any) -> List[torch.Generator]:
    """The ``torch.Generator`` objects that decide a loader's order and worker seeds: the loader's
    own ``generator=`` and its (batch) sampler's, each once. A loader built with ``generator=`` does
    not draw from the global RNG, so a stream restores these too."""
    found: List[torch.Generator] = []
    sampler = getattr(loader, "sampler", None)
    batch_sampler = getattr(loader, "batch_sampler", None)
    for owner in (loader, sampler, batch_sampler, getattr(batch_sampler, "sampler", None)):
        g = getattr(owner, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found


def generator_states(loader: Any) -> List[torch.Tensor]:
    return [g.get_state() for g in loader_generators(loader)]


def check_generator_states(loader: Any, states: Optional[List[torch.Tensor]]) -> List[torch.Generator]:
    """The loader's generators, after checking that ``states`` (from :func:`generator_states`, or None)
    fits them: a state saved for a loader with a different set of generators is an error, since the
    order could not be reproduced."""
    gens = loader_generators(loader)
    if states is None:
        return gens
    if not isinstance(states, (list, tuple)):
        raise ConfigurationError(f"the validation stream state's generator states are a {type(states).__name__}, "
                                 f"not a list", "load a state saved by the refiner's state_dict()")
    if len(gens) != len(states):
        raise ConfigurationError(
            f"the validation state was saved for a loader with {len(states)} seeded generator(s), this "
            f"loader has {len(gens)}",
            "build the validation DataLoader as it was when the state was saved (same generator= / sampler)")
    for g, st in zip(gens, states):
        if not is_generator_state(st, g.get_state()):
            raise ConfigurationError("the validation stream state holds a generator state that is not one "
                                     f"({type(st).__name__}{'' if not torch.is_tensor(st) else f' {st.dtype} {tuple(st.shape)}'})",
                                     "load a state saved by the refiner's state_dict()")
    return gens


def set_generator_states(loader: Any, states: Optional[List[torch.Tensor]]) -> None:
    """Put the loader's generators back to ``states`` (None: leave them)."""
    gens = check_generator_states(loader, states)
    for g, st in zip(gens, states or ()):
        g.set_state(st.clone())


def _clone(x):
    """A copy of a generator state or a list of them (None stays None)."""
    if x is None:
        return None
    return x.clone() if torch.is_tensor(x) else [t.clone() for t in x]


def _same_states(a: Optional[List[torch.Tensor]], b: Optional[List[torch.Tensor]]) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _persistent(loader: Any) -> bool:
    return bool(getattr(loader, "persistent_workers", False)) and (getattr(loader, "num_workers", 0) or 0) > 0


def opens_by_reset(loader: Any) -> bool:
    """Whether ``iter(loader)`` resets a live persistent-worker iterator rather than creating one.
    Creating one draws the workers' base seed from the RNG before the sampler draws its order; a
    reset draws only the order, so the two give different orders from the same RNG state."""
    return _persistent(loader) and getattr(loader, "_iterator", None) is not None


def open_as(loader: Any, by_reset: bool) -> None:
    """Make the next ``iter(loader)`` open its pass as a saved pass was opened (:func:`opens_by_reset`):
    start the persistent workers now, or drop a live iterator (its workers shut down), leaving the
    global RNG and the loader's generators as they were. Loaders without persistent workers, and
    loaders already in that condition, are left alone."""
    if not _persistent(loader) or opens_by_reset(loader) == bool(by_reset):
        return
    if by_reset:
        saved = generator_states(loader)
        with PrivateRNG():   # the new workers' base seed comes from a throwaway state
            iter(loader)
        set_generator_states(loader, saved)
    else:
        loader._iterator = None   # the DataLoader shuts the dropped iterator's workers down


class ValidationStream:
    """Cycles over ``loader`` forever; ``next()`` returns ``(inputs, targets)``."""

    def __init__(self, loader: Iterable, rng: PrivateRNG):
        if loader is None:
            raise EmptyValidationError("no validation loader was given",
                                       "pass a DataLoader over a small clean labelled set as val_loader")
        if isinstance(loader, (str, bytes)) or not (hasattr(type(loader), "__iter__")
                                                    or hasattr(type(loader), "__getitem__")):
            raise ConfigurationError(
                f"the validation loader ({type(loader).__name__} {str(loader)[:40]!r}) "
                f"{'is text, not batches' if isinstance(loader, (str, bytes)) else 'cannot be iterated'}",
                "pass a DataLoader over a small clean labelled set (or a list of (inputs, targets) batches) as "
                "val_loader")
        if isinstance(loader, Iterator):   # a generator or an iterator: one pass, then empty
            raise ConfigurationError(
                f"the validation loader is a one-shot iterator ({type(loader).__name__}); the refiner reads "
                "it again and again", "pass something that can be iterated many times: a DataLoader, a list "
                "of (inputs, targets) batches, or an object whose __iter__ starts a new pass")
        self.loader = loader
        self.rng = rng
        self._it = None
        self.pass_rng_state: Optional[torch.Tensor] = None  # private RNG state when this pass began
        self.pass_generator_states: Optional[List[torch.Tensor]] = None  # the loader's generators then
        self.pass_by_reset = False  # the pass reset a persistent-worker iterator (opens_by_reset)
        self.consumed = 0  # batches taken in this pass
        #: reads asked of the stream, failed ones included (a caller that rolls back after a
        #: failure restores the position only when this moved)
        self.reads = 0
        self._ended = False    # the open pass's iterator has reported its end
        self._reopen = False   # a restored position whose pass is re-opened at the next read (restore)

    def _start_pass(self) -> None:
        self.pass_rng_state = self.rng.state.clone()
        self.pass_generator_states = generator_states(self.loader)
        self.pass_by_reset = opens_by_reset(self.loader)
        self.consumed = 0
        self._ended = False
        with self.rng:
            self._it = iter(self.loader)

    def _reopen_pass(self) -> None:
        """Re-open the pass :meth:`restore` put back: from its RNG and generator states, skipping the
        batches taken; the private RNG and the loader's generators then as they are now. A failure
        (a read error, a pass shorter than before) leaves the stream as it was, still to re-open."""
        open_as(self.loader, self.pass_by_reset)
        now = generator_states(self.loader)
        set_generator_states(self.loader, self.pass_generator_states)
        saved = self.rng.state
        self.rng.state = self.pass_rng_state.clone()
        try:
            with self.rng:
                it = iter(self.loader)
                for taken in range(self.consumed):
                    if next(it, _END) is _END:
                        raise _later_pass_error(taken, self.consumed)
        finally:
            self.rng.state = saved
            set_generator_states(self.loader, now)
        self._it, self._ended, self._reopen = it, False, False

    def _take(self) -> Any:
        """The next raw batch of the current pass (opening one where none is open), or ``_END`` at
        its end; the stream then stays at that end until a read opens the next pass."""
        if self._reopen:
            self._reopen_pass()
        if self._it is None:
            self._start_pass()
        if self._ended:
            return _END
        with self.rng:
            batch = next(self._it, _END)
        if batch is _END:
            self._ended = True
        else:
            self.consumed += 1
        return batch

    def _next_pass(self) -> Any:
        """Open the next pass after the current one ended and return its first raw batch."""
        before = self.consumed
        self._start_pass()
        batch = self._take()
        if batch is _END:
            raise _later_pass_error(0, before)
        return batch

    def next(self) -> Tuple[Any, torch.Tensor]:
        self.reads += 1
        batch = self._take()
        if batch is _END:
            if self.consumed == 0:   # the pass opened now is empty
                raise EmptyValidationError("the validation loader yields no batches",
                                           "pass a loader over at least one clean labelled sample (check drop_last "
                                           "and the split)")
            batch = self._next_pass()
        return split_batch(batch)

    def one_pass(self, limit: int):
        """Yield the batches of one pass, at most ``limit`` (``len(loader)``), reading from where the
        stream stands: at the end of a pass (or before the first) a new pass whole; inside one, ``c``
        batches in, its rest and then the first ``c`` batches of the next. It stops at a pass's end
        whatever ``len(loader)`` claims (an ``IterableDataset`` whose ``__len__`` over-reports), so no
        batch is read twice."""
        batch = self.next()           # opens the next pass where the current one has ended
        start = self.consumed - 1     # batches of this pass taken before it
        n, wrapped = 1, False
        yield batch
        while n < limit:
            self.reads += 1
            raw = self._take()
            if raw is _END:
                if wrapped or start == 0:
                    return
                wrapped, limit = True, min(limit, n + start)
                raw = self._next_pass()
            n += 1
            yield split_batch(raw)

    def state_dict(self) -> dict:
        """The pass's position as copies; ``generators_now``: the loader's generators as they are now
        (code outside the refiner may draw from them too), set back after a restore re-opens the pass."""
        return {"pass_rng_state": _clone(self.pass_rng_state), "consumed": self.consumed,
                "generator_states": _clone(self.pass_generator_states), "by_reset": self.pass_by_reset,
                "generators_now": _clone(generator_states(self.loader))}

    _CACHED = False
    _GENERATORS_KEY = "generator_states"
    _RESET_KEY = "by_reset"

    _KEYS = ("pass_rng_state", "consumed", "generator_states")

    def check_state(self, state: dict) -> None:
        """Raise (changing nothing) when ``state`` cannot be restored on this stream's loader."""
        if not isinstance(state, dict):
            raise ConfigurationError(f"a validation stream state must be a dict, got {type(state).__name__}",
                                     "load a state saved by the refiner's state_dict()")
        if bool(state.get("cached")) != self._CACHED:
            raise ConfigurationError(
                f"state was saved with cache_validation={bool(state.get('cached'))}, this refiner has "
                f"cache_validation={self._CACHED}",
                "build the refiner with the same cache_validation setting before loading")
        missing = [k for k in self._KEYS if k not in state]
        position = state.get("consumed", state.get("pos"))
        if missing or not isinstance(position, int) or position < 0:
            raise ConfigurationError(f"the validation stream state lacks {missing} or has a bad position {position!r}",
                                     "load a state saved by the refiner's state_dict()")
        rng = state[self._KEYS[0]]
        if rng is not None and not is_generator_state(rng, self.rng.state):
            raise ConfigurationError("the validation stream state's RNG state is not a generator state",
                                     "load a state saved by the refiner's state_dict()")
        check_generator_states(self.loader, state.get(self._GENERATORS_KEY))
        check_generator_states(self.loader, state.get("generators_now"))
        if not isinstance(state.get(self._RESET_KEY, False), bool):
            raise ConfigurationError(f"the validation stream state's {self._RESET_KEY} is not True or False",
                                     "load a state saved by the refiner's state_dict()")

    def load_state_dict(self, state: dict) -> None:
        """Re-open the pass that was running and skip the batches already taken."""
        self.check_state(state)
        gen_states = state.get(self._GENERATORS_KEY)
        pass_rng_state = state.get("pass_rng_state")
        it = None
        if pass_rng_state is not None:
            open_as(self.loader, bool(state.get("by_reset", False)))
            saved_gens = generator_states(self.loader)
            set_generator_states(self.loader, gen_states)
            saved = self.rng.state
            self.rng.state = pass_rng_state.clone()
            try:
                with self.rng:
                    it = iter(self.loader)
                    for _ in range(int(state["consumed"])):
                        if next(it, _END) is _END:
                            raise ConfigurationError(
                                f"the validation stream state is {state['consumed']} batches into a pass, but this "
                                "loader's pass is shorter", "build the validation loader as it was when the state was saved")
            except BaseException:
                set_generator_states(self.loader, saved_gens)
                raise
            finally:
                self.rng.state = saved
            if state.get("generators_now") is not None:   # where they were at the save (older states: after the open)
                set_generator_states(self.loader, state["generators_now"])
        self._it, self._ended, self._reopen = it, False, False
        self.pass_rng_state = _clone(pass_rng_state)
        self.pass_generator_states = _clone(gen_states)
        self.pass_by_reset = bool(state.get("by_reset", False)) if it is not None else False
        self.consumed = int(state["consumed"]) if it is not None else 0

    def restore(self, state: dict) -> None:
        """Put back a position this stream's :meth:`state_dict` gave (a failed call's rollback) without
        reading the loader: the pass is re-opened at the next read (:meth:`_reopen_pass`), so the
        rollback cannot fail half-way and :meth:`state_dict` is at once what it was."""
        pass_rng_state = state.get("pass_rng_state")
        opened = pass_rng_state is not None
        self.pass_rng_state = _clone(pass_rng_state)
        self.pass_generator_states = _clone(state.get(self._GENERATORS_KEY))
        self.pass_by_reset = bool(state.get("by_reset", False)) if opened else False
        self.consumed = int(state["consumed"]) if opened else 0
        self._it, self._ended, self._reopen = None, False, opened


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
        self._fill_generator_states: Optional[List[torch.Tensor]] = None  # the loader's generators then
        self._fill_by_reset = False  # the pass reset a persistent-worker iterator (opens_by_reset)

    def _fill(self) -> None:
        if self.prepare is None:
            raise RuntimeError("CachedValidationStream.prepare must be set before the first batch is read")
        restoring = self._fill_rng_state is not None
        saved = self.rng.state
        saved_gens = generator_states(self.loader)
        if restoring:  # rebuild the pass a saved state refers to, leaving the RNGs where they are now
            open_as(self.loader, self._fill_by_reset)
            self.rng.state = self._fill_rng_state.clone()
            set_generator_states(self.loader, self._fill_generator_states)
        fill_state = self.rng.state.clone()
        fill_generators = generator_states(self.loader)
        fill_by_reset = opens_by_reset(self.loader)
        try:
            with self.rng:
                raw = [split_batch(b) for b in self.loader]
            batches = [self.prepare(x, y) for x, y in raw]
        finally:
            if restoring:
                self.rng.state = saved
                set_generator_states(self.loader, saved_gens)
        if not batches:
            raise EmptyValidationError("the validation loader yields no batches",
                                       "pass a loader over at least one clean labelled sample (check drop_last and the split)")
        self._batches, self._fill_rng_state, self._fill_generator_states = batches, fill_state, fill_generators
        self._fill_by_reset = fill_by_reset
        self._pos %= len(batches)

    def next(self) -> Tuple[Any, torch.Tensor]:
        self.reads += 1
        if self._batches is None:
            self._fill()
        batch = self._batches[self._pos]
        self._pos = (self._pos + 1) % len(self._batches)
        return batch

    def one_pass(self, limit: int):
        """Yield one pass of the cached batches (at most ``limit``) from where the stream stands."""
        for _ in range(min(limit, self.pass_length())):
            yield self.next()

    def pass_length(self) -> int:
        """Batches per pass (reads the loader if it was not read yet)."""
        self.reads += 1
        if self._batches is None:
            self._fill()
        return len(self._batches)

    def state_dict(self) -> dict:
        state = None if self._fill_rng_state is None else self._fill_rng_state.clone()
        return {"cached": True, "fill_rng_state": state, "pos": self._pos,
                "fill_generator_states": _clone(self._fill_generator_states), "fill_by_reset": self._fill_by_reset}

    _CACHED = True
    _GENERATORS_KEY = "fill_generator_states"
    _RESET_KEY = "fill_by_reset"
    _KEYS = ("fill_rng_state", "pos", "fill_generator_states")

    def load_state_dict(self, state: dict) -> None:
        self.check_state(state)
        self.restore(state)

    def restore(self, state: dict) -> None:
        """Put back a checked position; a pass other than the cached one is rebuilt at the next read."""
        fill, gens = state.get("fill_rng_state"), state.get(self._GENERATORS_KEY)
        by_reset = bool(state.get("fill_by_reset", False))
        same_pass = (self._batches is not None and fill is not None and self._fill_rng_state is not None
                     and torch.equal(fill, self._fill_rng_state) and _same_states(gens, self._fill_generator_states)
                     and by_reset == self._fill_by_reset)
        if not same_pass:  # rebuilt lazily, on the next read
            self._batches = None
            self._fill_rng_state = None if fill is None else fill.clone()
            self._fill_generator_states = _clone(gens)
            self._fill_by_reset = by_reset
        self._pos = int(state["pos"])
