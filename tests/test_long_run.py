"""Long run with corrupted data: 2,000 updates, 1 % of training batches and 1 % of validation batches
non-finite. A loop that catches augplug's typed errors and skips the batch ends with finite weights
and the same model, optimizer and refiner state as a run where those batches were simply dropped."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner
from augplug.errors import AugplugError

from fault_harness import same

STEPS, C, D, B = 2000, 5, 10, 16


class StreamLoader:
    """Five fixed validation batches per pass; ``bad[(pass, position)]`` inserts a non-finite batch."""

    def __init__(self, bad=None):
        g = torch.Generator().manual_seed(7)
        self.batches = [(torch.randn(8, D, generator=g), torch.randint(0, C, (8,), generator=g)) for _ in range(5)]
        self.bad = bad or {}
        self.passes = 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        p = self.passes
        self.passes += 1
        for i, batch in enumerate(self.batches):
            if (p, i) in self.bad:
                yield self.bad[(p, i)]
            yield batch


def _train(train_batches, loader):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # the exact schedule: every refresh reads its 2 batches, 1,000 validation reads in all
    refiner = AugmentationRefiner(model, opt, loader, schedule=dict(refresh_every=4, val_batches=2, fresh_batches=None,
                                                                               budget=None))
    skipped = 0
    for x, y in train_batches:
        try:
            loss = refiner(model(x), y, num_original=4)
        except AugplugError:
            skipped += 1
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt, refiner, skipped


@pytest.mark.filterwarnings("ignore:augplug skipped")
def test_two_thousand_steps_with_one_percent_corrupted_batches():
    g = torch.Generator().manual_seed(3)
    good = [(torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(STEPS)]
    corrupt_at = set(torch.randperm(STEPS + STEPS // 100, generator=g)[:STEPS // 100].tolist())
    dirty, it = [], iter(good)
    for i in range(STEPS + STEPS // 100):
        if i in corrupt_at:  # half NaN inputs, half inf soft targets
            x, y = good[i % STEPS]
            if i % 2:
                x = x.clone()
                x[3] = float("nan")
                dirty.append((x, y))
            else:
                soft = torch.nn.functional.one_hot(y, C).float()
                soft[5, 0] = float("inf")
                dirty.append((x, soft))
        else:
            dirty.append(next(it))
    # 2,000 updates x 2 validation batches every 4 updates = 1,000 validation reads; 10 inserted bad
    passes = torch.randperm(200, generator=g)[:10].tolist()
    bad_val = {(p, int(p) % 5): (torch.full((8, D), float("nan") if p % 2 else float("inf")),
                                 torch.randint(0, C, (8,))) for p in passes}

    m1, o1, r1, s1 = _train(dirty, StreamLoader(bad_val))
    m2, o2, r2, s2 = _train(good, StreamLoader())
    assert s1 == STEPS // 100 and s2 == 0
    assert r1.step_count == r2.step_count == STEPS
    assert r1.skipped_val_batches == len(bad_val) and r2.skipped_val_batches == 0
    assert all(torch.isfinite(p).all() for p in m1.parameters())
    same(m2.state_dict(), m1.state_dict())
    same(o2.state_dict(), o1.state_dict())
    a, b = copy.deepcopy(r1.state_dict()), copy.deepcopy(r2.state_dict())
    for s in (a, b):  # the stream's position and the skip counter differ by construction
        s.pop("stream"), s.pop("skipped_val_batches")
    same(b, a)
