"""ISDA under torch.distributed: two processes (gloo, CPU) hold the same statistics as one process
that sees both processes' batches, and each process's per-sample losses match that process's rows."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from augplug.isda import ISDALoss

C, A, STEPS, PER_RANK = 4, 5, 4, 6


def _batch(step, rank):
    g = torch.Generator().manual_seed(1000 * step + rank)
    y = torch.randint(0, C, (PER_RANK,), generator=g)
    y[0] = (step + rank) % C  # every step has a class only one of the ranks sees
    return torch.randn(PER_RANK, A, generator=g) * (1 + y[:, None]) + 2 * y[:, None], y


def _head():
    torch.manual_seed(0)
    return nn.Linear(A, C)


def _run(isda, head, batches):
    losses = []
    for f, y in batches:
        losses.append(isda.per_sample_loss(f, head(f), y, head).detach())
    return torch.cat(losses)


CONFIGS = [("full", True), ("diagonal", True), ("diagonal", False)]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        assert dist.get_world_size() == 2
        out = {"world": dist.get_world_size()}
        for covariance, sync in CONFIGS:
            head = _head()
            isda = ISDALoss.for_head(head, covariance=covariance, decay=0.8, sync=sync)
            losses = _run(isda, head, [_batch(s, rank) for s in range(STEPS)])
            out[f"{covariance}-{sync}"] = {"state": isda.state_dict(), "losses": losses}
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("isda_ddp")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.mark.parametrize("covariance", ["full", "diagonal"])
def test_two_processes_equal_one_process(two_ranks, covariance):
    assert all(r["world"] == 2 for r in two_ranks)
    ranks = [r[f"{covariance}-True"] for r in two_ranks]
    head = _head()
    single = ISDALoss.for_head(head, covariance=covariance, decay=0.8)
    batches = [tuple(torch.cat(t) for t in zip(_batch(s, 0), _batch(s, 1))) for s in range(STEPS)]
    losses = _run(single, head, batches).view(STEPS, 2, PER_RANK)
    for name in ("count", "mean", "cov", "steps"):
        a, b = ranks[0]["state"][name], ranks[1]["state"][name]
        assert torch.equal(a, b), name  # identical on every process
        assert torch.allclose(a, single.state_dict()[name], atol=1e-5, rtol=1e-5), name
    for r in range(2):
        assert torch.allclose(ranks[r]["losses"].view(STEPS, PER_RANK), losses[:, r], atol=1e-5)


def test_without_sync_each_process_keeps_its_own_statistics(two_ranks):
    ranks = [r["diagonal-False"] for r in two_ranks]
    head = _head()
    alone = ISDALoss.for_head(head, covariance="diagonal", decay=0.8)
    _run(alone, head, [_batch(s, 0) for s in range(STEPS)])
    assert torch.allclose(ranks[0]["state"]["cov"], alone.cov, atol=1e-6)
    assert not torch.allclose(ranks[0]["state"]["cov"], ranks[1]["state"]["cov"])
