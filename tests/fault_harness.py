"""A reusable harness for fault tests: every bad input must get a typed error (or be skipped and
counted), leave the model, the optimizer and the refiner exactly as they were, and let the next good
steps run bit-identically to a twin that never saw the bad call.

A :class:`Rig` is one training setup (model, optimizer, refiner, validation data, a deterministic
good step). ``make_rig(kind)`` builds the kinds every entry point is tried with; a new entry point
gets its cases by adding a kind here.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner
from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner
from augplug.errors import AugplugError
from augplug.methods.autodo import AutoDO
from augplug.refiner import refiner_kwargs

C = 4          # classes
B = 8          # training batch
N = 32         # training points (AutoDO tables)
IMG = (1, 6, 6)


class Net(nn.Module):
    """Conv-BatchNorm body and an MLP head ending in ``fc`` (found by the refiner)."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                                  nn.Linear(3 * 36, 12), nn.ReLU())
        self.fc = nn.Linear(12, C)

    def forward(self, x):
        return self.fc(self.body(x))


class PoisonableLoader:
    """A deterministic validation loader over fixed batches; ``poison`` holds batch positions (in the
    pass) whose inputs are replaced by ``value`` (NaN by default) while the set is not empty;
    ``interrupt_at`` raises KeyboardInterrupt when that position is read (once)."""

    def __init__(self, batches: List[tuple]):
        self.batches = batches
        self.poison: set = set()
        self.value = float("nan")
        self.interrupt_at: Optional[int] = None
        self.extra: Dict[int, tuple] = {}  # position -> a batch inserted before the batch at that position

    def __len__(self):
        return len(self.batches) + len(self.extra)

    def __iter__(self):
        i = 0
        while i < len(self.batches):  # read at each step: changes apply from the next batch on
            if i in self.extra:
                yield self.extra[i]
            if self.interrupt_at == i:
                self.interrupt_at = None
                raise KeyboardInterrupt
            batch = self.batches[i]
            if i in self.poison:
                batch = (torch.full_like(batch[0], self.value),) + tuple(batch[1:])
            yield batch
            i += 1


def val_batches(seed: int = 1, n: int = 3, size: int = 8, shape=IMG) -> List[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=g), torch.randint(0, C, (size,), generator=g)) for _ in range(n)]


#: refiner options of each kind (AugmentationRefiner unless the kind says otherwise)
KINDS: Dict[str, Dict[str, Any]] = {
    "saflex": {},
    "saflex-full": {"mode": "full"},
    "saflex-cached": {"cache_validation": True},
    "share": {"aug_weight": "adaptive"},
    "l2rw": {"method": "l2rw"},
    "none": {"method": "none"},
    "isda": {"isda": True},
    "influence": {"method": "influence", "method_options": {"damping": 0.1}},
    "autodo": {"method": "autodo", "refresh_every": 1, "val_batches": 1,
               "method_options": {"num_points": N, "num_classes": C}},
    "contrastive": {},
}
REFINER_KINDS = [k for k in KINDS if k != "contrastive"]
#: kinds that read the validation set
SCORING_KINDS = [k for k in KINDS if k != "none"]


@dataclass
class Rig:
    kind: str
    model: nn.Module
    opt: torch.optim.Optimizer
    refiner: Any
    val: PoisonableLoader
    num_original: int = 2
    extra: Dict[str, Any] = field(default_factory=dict)
    steps_done: int = 0

    def batch(self, seed: int):
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.randn(B, *IMG, generator=g)
        y = torch.randint(0, C, (B,), generator=g)
        index = torch.randperm(N, generator=g)[:B]
        return x, y, index

    def call(self, x, y, index=None, **kw):
        """One refiner call on ``x`` (the model's forward included); returns the loss."""
        if self.kind == "contrastive":
            return self.refiner(x, y, **{"num_original": self.num_original, **kw})
        if self.kind == "autodo":
            x = self.refiner.augment(x, index)
            kw.setdefault("index", index)
        kw.setdefault("num_original", self.num_original)
        return self.refiner(self.model(x), y, **kw)

    def step(self, seed: Optional[int] = None) -> float:
        """One good training step (deterministic in ``seed``)."""
        seed = self.steps_done if seed is None else seed
        x, y, index = self.batch(seed)
        torch.manual_seed(seed)
        loss = self.call(x, y, index)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.steps_done += 1
        return float(loss.detach())

    def snapshot(self) -> Dict[str, Any]:
        return copy.deepcopy({"model": self.model.state_dict(), "opt": self.opt.state_dict(),
                              "refiner": self.refiner.state_dict(), "step_count": self.refiner.step_count,
                              "calls": self.refiner.calls})


def make_rig(kind: str = "saflex", *, val: Optional[PoisonableLoader] = None, optimizer=None, **options) -> Rig:
    torch.manual_seed(0)
    val = val if val is not None else PoisonableLoader(val_batches())
    # the twins must make identical choices: the exact schedule, not one driven by measured time
    # (a rejected call's effect on the budget is tested with a fake clock in test_budget.py)
    options.setdefault("budget", None)
    if kind == "contrastive":
        image = nn.Sequential(nn.Flatten(), nn.Linear(36, 8))
        text = ClassEmbeddings(C, 8)
        model = nn.ModuleDict({"image": image, "text": text})
        opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1)
        r = ContrastiveRefiner(image, text, opt, val, class_prompts=torch.arange(C),
                               **refiner_kwargs(options, refiner=ContrastiveRefiner))
        return Rig(kind, model, opt, r, val)
    model = Net()
    opt = optimizer(model.parameters()) if optimizer else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kw = dict(refresh_every=2)
    kw.update(copy.deepcopy(KINDS[kind]))
    kw.update(options)
    r = AugmentationRefiner(model, opt, val, **refiner_kwargs(kw))
    return Rig(kind, model, opt, r, val, num_original=0 if kind == "autodo" else 2)


def same(a, b, path: str = "state") -> None:
    """Assert two nested states are identical (tensors bit for bit, NaN equal to NaN)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and a.dtype == b.dtype, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(torch.nan_to_num(a, 7.0),
                                                                          torch.nan_to_num(b, 7.0))), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, set(a) ^ set(b) if isinstance(b, dict) else b)
        for k in a:
            same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, (path, a, b)


def assert_rejected(kind: str, fault: Callable[[Rig], Callable[[], Any]], error=AugplugError, *, prime: int = 3,
                    after: int = 3, match: Optional[str] = None, **options) -> AugplugError:
    """``fault(rig)`` does the user's own work (a forward pass, which may update BatchNorm
    statistics) and returns the bad call. It is prepared on a primed rig and on its twin; the bad
    call must then raise ``error`` (an augplug error names the problem and the fix) and change
    nothing, and the next ``after`` good steps must equal the twin's, which never made the call."""
    rig, twin = make_rig(kind, **options), make_rig(kind, **options)
    for i in range(prime):
        rig.step(i)
        twin.step(i)
    bad_call = fault(rig)
    fault(twin)
    before = rig.snapshot()
    with pytest.raises(error, match=match) as info:
        bad_call()
    if isinstance(info.value, AugplugError):
        assert info.value.problem and info.value.fix, "an augplug error names the problem and the fix"
    same(before, rig.snapshot())
    for i in range(prime, prime + after):
        assert rig.step(i) == twin.step(i)
    same(twin.snapshot(), rig.snapshot())
    return info.value


def until_refresh(rig: Rig) -> None:
    """Good steps until the next call refreshes the validation direction."""
    while not rig.refiner.direction_is_due():
        rig.step()


def poisoned(rig: Rig, call: Callable[[], Any], **loader_changes) -> Callable[[], Any]:
    """``call`` with the rig's validation loader changed (``batches=``, ``poison=``, ``value=``,
    ``interrupt_at=``) for its duration."""
    def run():
        saved = {k: getattr(rig.val, k) for k in loader_changes}
        for k, v in loader_changes.items():
            setattr(rig.val, k, v)
        try:
            return call()
        finally:
            for k, v in saved.items():
                setattr(rig.val, k, v)
    return run


def user_call(rig: Rig, seed: int = 99, change=None, **kw) -> Callable[[], Any]:
    """Run the user's forward on a batch now; return the refiner call on its logits.
    ``change(logits, targets) -> (logits, targets, kwargs)`` makes the batch bad."""
    x, y, index = rig.batch(seed)
    if rig.kind == "contrastive":
        return lambda: rig.refiner(x, y, **{"num_original": rig.num_original, **kw})
    if rig.kind == "autodo":
        x = rig.refiner.augment(x, index)
        kw.setdefault("index", index)
    z = rig.model(x)
    extra = {}
    if change is not None:
        z, y, extra = change(z, y)
    kw.update(extra)
    kw.setdefault("num_original", rig.num_original)
    return lambda: rig.refiner(z, y, **kw)
