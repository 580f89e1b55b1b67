"""Two real processes (Accelerate on CPU, gloo) against one process holding the same global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from augplug import AugmentationRefiner
from augplug.refiner import refiner_kwargs

WORLD = 2
ROWS = 8            # rows per process
N_ORIG = 3          # original rows at the start of each process's batch
C, D = 4, 6


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xv, yv = torch.randn(22, D), torch.randint(0, C, (22,))
    # 22 validation samples in batches of 5: the last batch is short (no padding may creep in)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=5, shuffle=True)
    x = torch.randn(WORLD * ROWS, D)
    y = torch.randint(0, C, (WORLD * ROWS,))
    return model, opt, val, x, y


CASES = {
    "saflex": dict(refresh_every=1, seed=3),
    "saflex-batch-norm-weights": dict(refresh_every=1, seed=3, weight_norm="batch", orig_weight=0.5),
    "saflex-class-norm-weights": dict(refresh_every=1, seed=3, weight_norm="class"),
    # weight_norm="auto" (the SAflex default) decides on the global batch: by class without
    # originals anywhere, over the augmented rows when any process holds originals
    "saflex-augmented-only": dict(refresh_every=1, seed=3, _n_orig=(0, 0)),
    "saflex-originals-on-one-process": dict(refresh_every=1, seed=3, _n_orig=(0, 3)),
    "l2rw": dict(method="l2rw", refresh_every=1, seed=3),
    "saflex-adaptive-share": dict(refresh_every=1, seed=3, aug_weight="adaptive"),
    # the share's direction signal: per-row agreements over residuals, summed over the global batch
    "saflex-adaptive-share-direction": dict(refresh_every=1, seed=3, aug_weight="_direction"),
    # weights from the standardised log-likelihood: mean and std of the global batch
    "saflex-likelihood": dict(refresh_every=1, seed=3, weight_signal="likelihood"),
    "saflex-likelihood-augmented-only": dict(refresh_every=1, seed=3, weight_signal="likelihood", _n_orig=(0, 0)),
    # weight_signal="auto" decides on the global batch: the likelihood only without originals anywhere
    "saflex-auto-signal-augmented-only": dict(refresh_every=1, seed=3, weight_signal="auto", _n_orig=(0, 0)),
    "saflex-auto-signal-originals-on-one-process": dict(refresh_every=1, seed=3, weight_signal="auto", _n_orig=(0, 3)),
    "saflex+isda": dict(refresh_every=1, seed=3, isda={"lambda0": 0.5, "covariance": "full"}),
    # strength="auto" (the default) decides on the global batch: refinement on every process as
    # soon as one of them holds originals
    "saflex-auto-strength-originals-on-one-process": dict(refresh_every=1, seed=3, strength="auto", weighting="soft",
                                                          _n_orig=(0, 3)),
    # a validation window (one fresh batch per refresh): identical windows on every process, each
    # summing its own slots
    "saflex-window": dict(refresh_every=1, seed=3, fresh_batches=1),
    "saflex-window-full-model": dict(refresh_every=1, seed=3, fresh_batches=2, mode="full"),
    # the adaptive strength: cross-fitted on the global batch, the same value on every process
    "saflex-adaptive-strength": dict(refresh_every=1, seed=3, strength="_adaptive"),
    # evidence pooled by (source, class): the tables are sums over the global batch, so the second
    # step's weights (read from the first step's tables) match one process
    "saflex-pooled": dict(refresh_every=1, seed=3, pool=3),
}


def _sources(kw):
    """The rows' source ids for a case that pools evidence (empty otherwise)."""
    return torch.arange(WORLD * ROWS) % kw["pool"] if "pool" in kw else None


def _case(case):
    """The refiner options of ``case`` and the number of original rows on each process."""
    kw = dict(CASES[case])
    kw.setdefault("budget", None)   # compared with a single process step for step: the exact schedule
    if kw.get("method", "saflex") == "saflex":
        kw.setdefault("strength", 1.0)  # refine batches without originals too (the default trains them as given)
    if kw.get("strength") == "_adaptive":
        from augplug.valve import RefinementStrength
        kw["strength"] = RefinementStrength(init=0.5, lr=0.2)
    if kw.get("aug_weight") == "_direction":
        from augplug.share import AdaptiveShare
        kw["aug_weight"] = AdaptiveShare(signal="direction")
    return kw, kw.pop("_n_orig", (N_ORIG,) * WORLD)


def _isda_state(refiner):
    if refiner.isda is None:
        return {}
    return {k: t.detach().clone() for k, t in refiner.isda.state_dict().items() if torch.is_tensor(t)}


def _train_and_record(refiner, opt, net, step_loss):
    """Two training steps; per step the parameter gradients and the refiner's weights, soft targets,
    validation direction and loss, then the update count and the ISDA statistics."""
    out = {}
    for step in range(2):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        out[f"grad{step}"] = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
        out[f"weights{step}"] = refiner.stats["weights"].clone()
        out[f"soft{step}"] = refiner.stats["soft_targets"].clone()
        v = refiner.validation_direction  # None while nothing was refined (strength "auto" without originals)
        out[f"v{step}"] = None if v is None else {k: t.clone() for k, t in v.items()}
        out[f"val_loss{step}"] = refiner.stats["val_loss"]
        out[f"share{step}"] = float(refiner.aug_weight)
        out[f"strength{step}"] = float(refiner.stats["strength"])
        opt.step()
    out["step_count"] = refiner.step_count
    out["strength_state"] = None if refiner.strength is None else float(refiner.strength.value)
    out["isda"] = _isda_state(refiner)
    return out


def _accelerator():
    """A fresh CPU Accelerator in a forked worker, checked to span WORLD processes."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # a forked worker inherits any single-process state an earlier test created in the parent
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    assert acc.num_processes == WORLD
    return acc


def _worker(out_dir: str, case: str) -> None:
    acc = _accelerator()
    model, opt, val, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    kw, n_orig = _case(case)
    refiner = AugmentationRefiner(model, opt, val, accelerator=acc, **refiner_kwargs(kw))
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)
    src = _sources(kw)
    extra = {} if src is None else {"sources": src[rows]}
    out = _train_and_record(refiner, opt, acc.unwrap_model(model),
                            lambda: refiner(model(x[rows]), y[rows], num_original=n_orig[r], **extra))
    torch.save(out, os.path.join(out_dir, f"rank{r}.pt"))


def _launch(worker: str, *args: str) -> None:
    """Run ``worker(*args)`` in WORLD forked processes (``accelerate.debug_launcher``). On a machine
    with CUDA, autograd starts its device threads at the first backward pass (even a CPU one), and
    they do not survive a fork, so there the launch always happens from a fresh interpreter."""
    if not torch.cuda.is_available():
        from accelerate import debug_launcher

        debug_launcher(globals()[worker], args=args, num_processes=WORLD)
        return
    here = Path(__file__).resolve().parent
    code = ("import sys; from accelerate import debug_launcher; import test_distributed as t; "
            f"debug_launcher(getattr(t, {worker!r}), args=tuple(sys.argv[1:]), num_processes={WORLD})")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def _two_processes(tmp_path, case):
    _launch("_worker", str(tmp_path), case)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process(case):
    model, opt, val, x, y = _setup()
    kw, n_orig = _case(case)
    refiner = AugmentationRefiner(model, opt, val, **refiner_kwargs(kw))
    aug = torch.ones(WORLD * ROWS, dtype=torch.bool)
    for r in range(WORLD):
        aug[r * ROWS: r * ROWS + n_orig[r]] = False
    src = _sources(kw)
    extra = {} if src is None else {"sources": src}
    return _train_and_record(refiner, opt, model, lambda: refiner(model(x), y, augmented=aug, **extra))


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_match_one_process_on_the_global_batch(tmp_path, case):
    ranks, one = _two_processes(tmp_path, case), _single_process(case)
    for step in range(2):
        w = torch.cat([r[f"weights{step}"] for r in ranks])
        s = torch.cat([r[f"soft{step}"] for r in ranks])
        torch.testing.assert_close(w, one[f"weights{step}"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(s, one[f"soft{step}"], rtol=1e-5, atol=1e-6)
        # the refined weights are not trivially 1 (the comparison would be vacuous)
        assert float((one[f"weights{step}"] - 1).abs().max()) > 1e-3
        for r in ranks:
            for k, t in one[f"v{step}"].items():
                torch.testing.assert_close(r[f"v{step}"][k], t, rtol=1e-5, atol=1e-6)
            assert r[f"val_loss{step}"] == pytest.approx(one[f"val_loss{step}"], rel=1e-5)
            # the adaptive share moves identically on every process, as in one process
            assert r[f"share{step}"] == pytest.approx(one[f"share{step}"], rel=1e-6)
            # DDP's averaged gradient equals the one-process gradient of the whole global batch
            for n, g in one[f"grad{step}"].items():
                torch.testing.assert_close(r[f"grad{step}"][n], g, rtol=1e-4, atol=1e-6)
    assert all(r["step_count"] == one["step_count"] == 2 for r in ranks)
    for r in ranks:   # the strength each call used, and the learned one, as in one process
        assert [r[f"strength{k}"] for k in range(2)] == pytest.approx([one[f"strength{k}"] for k in range(2)], rel=1e-6)
        assert (r["strength_state"] is None) == (one["strength_state"] is None)
        if one["strength_state"] is not None:
            assert r["strength_state"] == pytest.approx(one["strength_state"], rel=1e-5)
    if "adaptive-share" in case:
        # the share steps at the first call after an update: the second call's loss uses a moved one
        assert one["share0"] == 1.0 and one["share1"] != one["share0"]
    if "adaptive-strength" in case:
        assert one["strength_state"] != 0.5 and one["strength1"] != one["strength0"]
    # ISDA's class statistics are identical on every process and equal those of one process
    if case.endswith("isda"):
        assert one["isda"] and float(one["isda"]["count"].sum()) > 0
        for r in ranks:
            assert r["isda"].keys() == one["isda"].keys()
            for k, t in one["isda"].items():
                torch.testing.assert_close(r["isda"][k], t, rtol=1e-5, atol=1e-6)


def _autodo_worker(out_dir: str) -> None:
    acc = _accelerator()
    model, opt, val, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    refiner = AugmentationRefiner(model, opt, val, method="autodo", accelerator=acc,
                                  method_options=dict(num_points=WORLD * ROWS, num_classes=C, models='WS', augment='off', hyper_lr=0.5),
                                  schedule=dict(refresh_every=1))
    r = acc.process_index
    for step in range(3):
        # each process sees different points; the second half of the points changes owner every step
        rows = torch.arange(ROWS) + r * ROWS if step % 2 == 0 else torch.arange(ROWS) * WORLD + r
        loss = refiner(model(x[rows]), y[rows], index=rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = {k: t.clone() for k, t in refiner.policy.tables.state_dict().items() if torch.is_tensor(t)}
    torch.save(state, os.path.join(out_dir, f"autodo{r}.pt"))


def test_autodo_tables_identical_across_processes(tmp_path):
    _launch("_autodo_worker", str(tmp_path))
    a, b = (torch.load(tmp_path / f"autodo{r}.pt", weights_only=True) for r in range(WORLD))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # every point was updated (by the process that held it), and not trivially
    assert bool((a["weight_logits"] != 0).all())


def _collectives_worker(out_dir: str) -> None:
    """Count the all-reduces of one refiner call (forward only) for three weight normalizations."""
    import torch.distributed as dist

    acc = _accelerator()
    counts = {}
    real = dist.all_reduce
    calls = []

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    agree = dict(weight_signal="agreement")
    for name, kw, n_orig in [("paper", dict(weight_norm="augmented", **agree), N_ORIG),
                             ("auto-norm-with-originals", agree, N_ORIG),
                             ("auto-norm-augmented-only", agree, 0),
                             ("auto-signal-with-originals", dict(weight_signal="auto"), N_ORIG),
                             ("auto-signal-augmented-only", dict(weight_signal="auto"), 0)]:
        model, opt, val, x, y = _setup()
        model, opt = acc.prepare(model, opt)
        refiner = AugmentationRefiner(model, opt, val, accelerator=acc, seed=3,
                                      **refiner_kwargs(kw, aug_weight=1.0, strength=1.0, refresh_every=4, budget=None))
        r = acc.process_index
        rows = slice(r * ROWS, (r + 1) * ROWS)
        per_call = []
        for step in range(3):
            logits = model(x[rows])
            calls.clear()
            dist.all_reduce = counting
            try:
                loss = refiner(logits, y[rows], num_original=n_orig)
            finally:
                dist.all_reduce = real
            per_call.append(len(calls))
            opt.zero_grad()
            loss.backward()
            opt.step()
        counts[name] = per_call
    torch.save(counts, os.path.join(out_dir, f"collectives{acc.process_index}.pt"))


def test_class_sums_are_reduced_only_when_used(tmp_path):
    """weight_norm="auto" (SAflex's default) needs the class sums only for a global batch without
    originals; with originals it costs no more collectives than the paper's normalization.
    weight_signal="auto" costs one collective to count the originals, and the likelihood's batch
    statistics one more when there are none."""
    _launch("_collectives_worker", str(tmp_path))

    def extra(name):
        return [a - b for a, b in zip(c[name], c["paper"])]

    for r in range(WORLD):
        c = torch.load(tmp_path / f"collectives{r}.pt", weights_only=True)
        assert extra("auto-norm-with-originals") == [0, 0, 0], c
        assert extra("auto-norm-augmented-only") == [1, 1, 1], c      # the class sums
        assert extra("auto-signal-with-originals") == [1, 1, 1], c    # the count of originals
        assert extra("auto-signal-augmented-only") == [3, 3, 3], c    # count, likelihood statistics, class sums


def _influence_worker(out_dir: str) -> None:
    acc = _accelerator()
    model, opt, val, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    refiner = AugmentationRefiner(model, opt, val, accelerator=acc, method="influence",
                                  method_options=dict(damping=0.1, pairing='none'), schedule=dict(refresh_every=1))
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)
    loss = refiner(model(x[rows]), y[rows], num_original=N_ORIG)
    aug = refiner.stats["augmented"]
    torch.save({"weights": refiner.stats["weights"][aug].clone(),
                "influence": refiner.policy.last_influence.clone()}, os.path.join(out_dir, f"influence{r}.pt"))
    loss.backward()


def test_influence_weights_have_mean_one_over_the_global_batch(tmp_path):
    """The influence policy's weights are renormalized once, by the refiner, over the augmented rows
    of all processes (the RMS of the scores is each process's own)."""
    from augplug.methods.influence import influence_weights

    _launch("_influence_worker", str(tmp_path))
    ranks = [torch.load(tmp_path / f"influence{r}.pt", weights_only=True) for r in range(WORLD)]
    raw = torch.cat([influence_weights(d["influence"]) for d in ranks])
    w = torch.cat([d["weights"] for d in ranks])
    torch.testing.assert_close(w, raw * (raw.numel() / raw.sum()), rtol=1e-5, atol=1e-6)
    assert float(w.mean()) == pytest.approx(1.0, rel=1e-5)
    # each process's own mean is not 1: a per-process normalization would be visible
    assert all(abs(float(d["weights"].mean()) - 1) > 1e-3 for d in ranks)


# ---------------------------------------------------------------------------------------------- contrastive
# Class prompts (FLYP-style): rows are independent given the prompts, so two processes with half the
# batch each must train exactly like one process with the whole batch. (With pairs, each process
# contrasts its own batch: its negatives are local, as in contrastive training without a gather.)
CONTRASTIVE_CASES = {
    "saflex": dict(refresh_every=1, seed=3),
    "saflex-batch-norm-weights": dict(refresh_every=1, seed=3, weight_norm="batch", orig_weight=0.5),
    "saflex-adaptive-share": dict(refresh_every=1, seed=3, aug_weight="_share"),
    "saflex-auto-strength-originals-on-one-process": dict(refresh_every=1, seed=3, strength="auto", weighting="soft",
                                                          _n_orig=(0, 3)),
    "l2rw": dict(method="l2rw", refresh_every=1, seed=3),
    "saflex-window": dict(refresh_every=1, seed=3, fresh_batches=1),
}


def _contrastive_setup(case):
    from augplug.contrastive import ClassEmbeddings, ContrastiveRefiner

    torch.manual_seed(0)
    img = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, 5))
    prompts = ClassEmbeddings(C, 5)
    params = list(img.parameters()) + list(prompts.parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    xv, yv = torch.randn(22, D), torch.randint(0, C, (22,))
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=5, shuffle=True)
    x, y = torch.randn(WORLD * ROWS, D), torch.randint(0, C, (WORLD * ROWS,))
    kw = dict(CONTRASTIVE_CASES[case])
    kw.setdefault("budget", None)
    n_orig = kw.pop("_n_orig", (N_ORIG,) * WORLD)
    if kw.get("aug_weight") == "_share":
        from augplug.share import AdaptiveShare
        kw["aug_weight"] = AdaptiveShare(init=0.5, lr=0.1)
    refiner = ContrastiveRefiner(img, prompts, opt, val, class_prompts=torch.arange(C), logit_scale=1.0,
                                 **refiner_kwargs(kw, refiner=ContrastiveRefiner))
    return refiner, opt, params, x, y, n_orig


def _contrastive_record(refiner, opt, params, step_loss, average=None):
    out = {}
    for step in range(2):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        if average is not None:
            average(params)   # what DDP does to the gradients
        out[f"grad{step}"] = [p.grad.detach().clone() for p in params]
        out[f"weights{step}"] = refiner.stats["weights"].clone()
        out[f"share{step}"] = float(refiner.aug_weight)
        out[f"strength{step}"] = refiner.stats["strength"]
        out[f"v{step}"] = {k: t.clone() for k, t in refiner.validation_direction.items()}
        opt.step()
    return out


def _contrastive_worker(out_dir: str, case: str) -> None:
    import torch.distributed as dist

    acc = _accelerator()
    refiner, opt, params, x, y, n_orig = _contrastive_setup(case)
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)

    def average(ps):
        for p in ps:
            dist.all_reduce(p.grad)
            p.grad /= WORLD

    out = _contrastive_record(refiner, opt, params, lambda: refiner(x[rows], y[rows], num_original=n_orig[r]), average)
    torch.save(out, os.path.join(out_dir, f"contrastive{r}.pt"))


@pytest.mark.parametrize("case", sorted(CONTRASTIVE_CASES))
def test_contrastive_two_processes_match_one_process(tmp_path, case):
    _launch("_contrastive_worker", str(tmp_path), case)
    ranks = [torch.load(tmp_path / f"contrastive{r}.pt", weights_only=True) for r in range(WORLD)]
    refiner, opt, params, x, y, n_orig = _contrastive_setup(case)
    aug = torch.ones(WORLD * ROWS, dtype=torch.bool)
    for r in range(WORLD):
        aug[r * ROWS: r * ROWS + n_orig[r]] = False
    one = _contrastive_record(refiner, opt, params, lambda: refiner(x, y, augmented=aug))
    for step in range(2):
        w = torch.cat([r[f"weights{step}"] for r in ranks])
        torch.testing.assert_close(w, one[f"weights{step}"], rtol=1e-5, atol=1e-6)
        assert float((one[f"weights{step}"] - 1).abs().max()) > 1e-3   # not vacuous
        for r in ranks:
            for a, b in zip(r[f"grad{step}"], one[f"grad{step}"]):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
            for k, t in one[f"v{step}"].items():
                torch.testing.assert_close(r[f"v{step}"][k], t, rtol=1e-5, atol=1e-6)
            assert r[f"share{step}"] == pytest.approx(one[f"share{step}"], rel=1e-6)
            assert r[f"strength{step}"] == one[f"strength{step}"] == 1.0
    if "adaptive" in case:
        # the share steps at the first call after an update: the second call's loss uses a moved one
        assert one["share0"] == 0.5 and one["share1"] != one["share0"]


def _budget_run(acc, mode: str, keys) -> dict:
    """30 steps of this process's rows under a budget; the listed stats of every call."""
    model, opt, val, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    refiner = AugmentationRefiner(model, opt, val, accelerator=acc, mode=mode, method_options=dict(strength=1.0),
                                  schedule=dict(refresh_every=1, budget=0.05))
    rows = slice(acc.process_index * ROWS, (acc.process_index + 1) * ROWS)
    seen = {k: [] for k in keys}
    for step in range(30):
        loss = refiner(model(x[rows]), y[rows], num_original=N_ORIG)
        opt.zero_grad()
        loss.backward()
        opt.step()
        for k in keys:
            seen[k].append(refiner.stats[k])
    return seen


def _budget_worker(out_dir: str) -> None:
    acc = _accelerator()
    out = _budget_run(acc, "last_layer", ("refresh_interval", "refreshed"))
    # full-model mode: the budget also spaces out model score passes, the same on every process
    out.update({f"full_{k}": v for k, v in
                _budget_run(acc, "full", ("refresh_interval", "model_scores_every", "score_pass")).items()})
    torch.save(out, os.path.join(out_dir, f"budget{acc.process_index}.pt"))


def test_budget_chooses_the_same_interval_on_every_process(tmp_path):
    """Each process measures its own times; they average them inside the refresh, so the refresh
    schedule (and with it every collective) stays the same on all of them; in full-model mode the
    model score passes' schedule too."""
    _launch("_budget_worker", str(tmp_path))
    a, b = (torch.load(tmp_path / f"budget{r}.pt", weights_only=True) for r in range(WORLD))
    assert a == b
    assert sum(a["refreshed"]) >= 2
    passes = set(a["full_score_pass"])
    assert "closed_form" in passes and passes - {"closed_form"}   # both kinds of call ran


def _bad_batch_worker(out_dir: str, refresh_every: str) -> None:
    """Rank 1's call is bad three times (NaN inputs, num_original larger than its batch, a label out
    of range). Every process must reject those calls (rank 0 with PeerBatchError), and a loop that
    skips them must end where a run that skipped the same steps on purpose ends."""
    from augplug.errors import AugplugError

    acc = _accelerator()
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)
    out = {}
    for name, poisoned in (("skipped", False), ("rejected", True)):
        model, opt, val, x, y = _setup()
        model, opt = acc.prepare(model, opt)
        refiner = AugmentationRefiner(model, opt, val, accelerator=acc, seed=3,
                                      schedule=dict(refresh_every=int(refresh_every)))
        errors, due = [], []
        for step in range(8):
            xs, ys, n_orig = x[rows].clone() + 0.1 * step, y[rows].clone(), N_ORIG
            if step in (2, 3, 6):
                due.append(refiner.direction_is_due())
                if not poisoned:
                    errors.append("skipped")
                    continue
                if r == 1:
                    if step == 2:
                        xs[1, 0] = float("nan")
                    elif step == 3:
                        n_orig = ROWS + 1
                    else:
                        ys[4] = C + 2
            try:
                loss = refiner(model(xs), ys, num_original=n_orig)
            except AugplugError as e:
                errors.append(type(e).__name__)
                continue
            opt.zero_grad()
            acc.backward(loss)
            opt.step()
        out[name] = {"errors": errors, "due": due, "step_count": refiner.step_count,
                     "params": {k: v.detach().clone() for k, v in acc.unwrap_model(model).state_dict().items()},
                     "refiner": {k: v for k, v in refiner.state_dict().items() if k in ("calls", "step_count", "v")}}
    torch.save(out, os.path.join(out_dir, f"bad{r}.pt"))


@pytest.mark.parametrize("refresh_every", [4, 1], ids=["refresh-every-4", "refresh-every-call"])
def test_a_bad_batch_on_one_process_is_rejected_on_every_process(tmp_path, refresh_every):
    _launch("_bad_batch_worker", str(tmp_path), str(refresh_every))
    ranks = [torch.load(tmp_path / f"bad{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[1]["rejected"]["errors"] == ["NonFiniteError", "ShapeError", "TargetError"]
    assert ranks[0]["rejected"]["errors"] == ["PeerBatchError"] * 3
    # bad calls between refreshes and on refresh calls
    expected_due = [False, False, True] if refresh_every == 4 else [True] * 3
    for rank in ranks:
        assert rank["rejected"]["due"] == rank["skipped"]["due"] == expected_due
        assert rank["rejected"]["step_count"] == rank["skipped"]["step_count"] == 5
        for key in ("params", "refiner"):
            a, b = rank["rejected"][key], rank["skipped"][key]
            for k in b:
                if isinstance(b[k], dict):
                    assert all(torch.equal(a[k][n], b[k][n]) for n in b[k]), (key, k)
                elif torch.is_tensor(b[k]):
                    assert torch.equal(a[k], b[k]), (key, k)
                else:
                    assert a[k] == b[k], (key, k)
    for k in ranks[0]["rejected"]["params"]:
        assert torch.equal(ranks[0]["rejected"]["params"][k], ranks[1]["rejected"]["params"][k])


def _contrastive_bad_worker(out_dir: str) -> None:
    from augplug.errors import AugplugError

    acc = _accelerator()
    refiner, opt, params, x, y, n_orig = _contrastive_setup("saflex")
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)
    errors = []
    for step in range(4):
        xs, ys = x[rows].clone(), y[rows].clone()
        if r == 1 and step == 1:
            xs[0, 0] = float("nan")
        if r == 1 and step == 2:
            ys[0] = C + 1
        try:
            refiner(xs, ys, num_original=n_orig[r]).backward()
        except AugplugError as e:
            errors.append(type(e).__name__)
            continue
        errors.append(None)
        opt.step()
        opt.zero_grad()
    torch.save({"errors": errors, "step_count": refiner.step_count}, os.path.join(out_dir, f"cbad{r}.pt"))


def test_contrastive_bad_batch_on_one_process_is_rejected_on_every_process(tmp_path):
    _launch("_contrastive_bad_worker", str(tmp_path))
    ranks = [torch.load(tmp_path / f"cbad{r}.pt", weights_only=True) for r in range(WORLD)]
    assert ranks[1]["errors"] == [None, "NonFiniteError", "TargetError", None]
    assert ranks[0]["errors"] == [None, "PeerBatchError", "PeerBatchError", None]
    assert ranks[0]["step_count"] == ranks[1]["step_count"] == 2


SEPARATE_STEPS = 4


def _separate_run(model, opt, refiner, views, originals, backward, net):
    """The separate pattern, SEPARATE_STEPS steps: ``refiner(model(x_aug), y_aug) + CE(model(x), y)``;
    per step the share the call used, whether it weighed the views against the rest, and the
    parameter gradients."""
    (xa, ya), (xo, yo) = views, originals
    out = {"share": [], "against_rest": [], "grads": []}
    for step in range(SEPARATE_STEPS):
        shift = 0.1 * step
        loss = refiner(model(xa + shift), ya) + nn.functional.cross_entropy(model(xo + shift), yo)
        opt.zero_grad()
        backward(loss)
        out["share"].append(float(refiner.stats["aug_weight"]))
        out["against_rest"].append(bool(refiner.stats["against_rest"]))
        out["grads"].append({n: p.grad.detach().clone() for n, p in net.named_parameters()})
        opt.step()
    out["final_share"] = float(refiner.aug_weight)
    return out


def _separate_split(x, y):
    """Per process: rows [0, 4) of its block are originals, [4, 8) views."""
    return [((x[r * ROWS + 4:(r + 1) * ROWS], y[r * ROWS + 4:(r + 1) * ROWS]),
             (x[r * ROWS:r * ROWS + 4], y[r * ROWS:r * ROWS + 4])) for r in range(WORLD)]


def _one_process_views(split):
    """``(model, opt, val, views, originals)`` for one process holding every process's part of
    ``split`` (views and originals joined in process order)."""
    model, opt, val, x, y = _setup()
    parts = split(x, y)
    views = tuple(torch.cat([p[0][k] for p in parts]) for k in range(2))
    originals = tuple(torch.cat([p[1][k] for p in parts]) for k in range(2))
    return model, opt, val, views, originals


def _separate_refiner(model, opt, val, **kw):
    from augplug.share import AdaptiveShare
    return AugmentationRefiner(model, opt, val, seed=3, **kw, **refiner_kwargs(
        {"refresh_every": 1, "budget": None, "aug_weight": AdaptiveShare(init=0.5, lr=0.3)}))


def _separate_process(split):
    """In a worker: ``(accelerator, model, optimizer, refiner, views, originals)`` of this process's
    part of ``split``, the model and optimizer prepared, the refiner registered."""
    acc = _accelerator()
    model, opt, val, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    refiner = _separate_refiner(model, opt, val, accelerator=acc)
    views, originals = split(x, y)[acc.process_index]
    return acc, model, opt, refiner, views, originals


def _separate_worker(out_dir: str) -> None:
    acc, model, opt, refiner, views, originals = _separate_process(_separate_split)
    out = _separate_run(model, opt, refiner, views, originals, acc.backward, acc.unwrap_model(model))
    torch.save(out, os.path.join(out_dir, f"separate{acc.process_index}.pt"))


def test_separate_pattern_two_processes_match_one_process(tmp_path):
    """Views alone beside the user's own originals term: the rest's agreement and the views'
    statistics are summed over the processes, so the share moves as in one process holding both
    processes' views and originals, and DDP's averaged gradient (the rest's scaled in its backward
    pass) equals that process's gradient."""
    _launch("_separate_worker", str(tmp_path))
    ranks = [torch.load(tmp_path / f"separate{r}.pt", weights_only=True) for r in range(WORLD)]
    model, opt, val, views, originals = _one_process_views(_separate_split)
    one = _separate_run(model, opt, _separate_refiner(model, opt, val), views, originals,
                        lambda loss: loss.backward(), model)
    assert one["against_rest"] == [False] + [True] * (SEPARATE_STEPS - 1)
    assert one["final_share"] != one["share"][1]   # the share moved: the comparison is not vacuous
    for r in ranks:
        assert r["against_rest"] == one["against_rest"]
        assert r["share"] + [r["final_share"]] == pytest.approx(one["share"] + [one["final_share"]], rel=1e-5)
        for step in range(SEPARATE_STEPS):
            for n, g in one["grads"][step].items():
                torch.testing.assert_close(r["grads"][step][n], g, rtol=1e-4, atol=1e-6)


def _sharded_val_worker(out_dir: str) -> None:
    from augplug.errors import ConfigurationError

    acc = _accelerator()
    model, opt, val, _, _ = _setup()
    shard = torch.utils.data.distributed.DistributedSampler(val.dataset, shuffle=False)
    loaders = {"distributed-sampler": torch.utils.data.DataLoader(val.dataset, batch_size=5, sampler=shard),
               "prepared": acc.prepare(torch.utils.data.DataLoader(val.dataset, batch_size=5)),
               "plain": val}
    found = {}
    for name, loader in loaders.items():
        try:
            AugmentationRefiner(model, opt, loader, accelerator=acc).remove_hooks()
            found[name] = "accepted"
        except ConfigurationError as e:
            found[name] = str(e)
    torch.save(found, os.path.join(out_dir, f"rank{acc.process_index}.pt"))


def test_a_validation_loader_sharded_per_process_is_refused(tmp_path):
    """A validation loader whose sampler gives each process its shard (DistributedSampler; timm's
    create_loader(distributed=True) builds one) or one passed through accelerator.prepare() would
    give each process a direction of its own shard: refused, naming the fix; a plain one is taken."""
    _launch("_sharded_val_worker", str(tmp_path))
    for r in range(WORLD):
        found = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        assert "DistributedSampler" in found["distributed-sampler"] and "whole validation set" in found["distributed-sampler"]
        assert "accelerator.prepare()" in found["prepared"]
        assert found["plain"] == "accepted"


def _uneven_split(x, y):
    """Rank 0: 6 views and 2 originals; rank 1: 2 views and 6 originals (of its 8 rows)."""
    views_n = (6, 2)
    return [((x[r * ROWS:r * ROWS + views_n[r]], y[r * ROWS:r * ROWS + views_n[r]]),
             (x[r * ROWS + views_n[r]:(r + 1) * ROWS], y[r * ROWS + views_n[r]:(r + 1) * ROWS])) for r in range(WORLD)]


def _uneven_run(model, opt, refiner, views, originals, backward, ce_scale):
    (xa, ya), (xo, yo) = views, originals
    shares = []
    for step in range(SEPARATE_STEPS + 2):
        shift = 0.1 * step
        loss = refiner(model(xa + shift), ya) + ce_scale * nn.functional.cross_entropy(model(xo + shift), yo)
        opt.zero_grad()
        backward(loss)
        opt.step()
        shares.append(float(refiner.aug_weight))
    return shares


def _separate_uneven_worker(out_dir: str) -> None:
    acc, model, opt, refiner, views, originals = _separate_process(_uneven_split)
    # DDP averages the processes' gradients: each scales its mean CE by its share of the originals
    scale = originals[1].shape[0] * WORLD / (WORLD * ROWS - 8)
    shares = _uneven_run(model, opt, refiner, views, originals, acc.backward, scale)
    torch.save(shares, os.path.join(out_dir, f"uneven{acc.process_index}.pt"))


def test_separate_pattern_with_uneven_batches_pools_the_rests_rows(tmp_path):
    """The direction signal's rest agreement was each process's mean over its own originals, then
    averaged over the processes: with uneven batches the share moved otherwise than in one process.
    The processes now pool the sums and row counts."""
    _launch("_separate_uneven_worker", str(tmp_path))
    ranks = [torch.load(tmp_path / f"uneven{r}.pt", weights_only=True) for r in range(WORLD)]
    model, opt, val, views, originals = _one_process_views(_uneven_split)
    one = _uneven_run(model, opt, _separate_refiner(model, opt, val), views, originals,
                      lambda loss: loss.backward(), 1.0)
    assert len(set(one)) > 2   # the share moved
    for r in ranks:
        assert r == pytest.approx(one, rel=1e-5)


def _bad_inputs_worker(out_dir: str, kind: str) -> None:
    """A bad sources= (kind "sources") or a validation batch with a label out of range (kind "val", the
    exact schedule: each batch is checked on the process that differentiates it) on rank 1 only."""
    from augplug import SAflex, Schedule
    from augplug.errors import AugplugError

    acc = _accelerator()
    model, opt, _, x, y = _setup()
    model, opt = acc.prepare(model, opt)
    g = torch.Generator().manual_seed(5)
    xv, yv = torch.randn(20, D, generator=g), torch.randint(0, C, (20,), generator=g)
    if kind == "val":
        yv[5:10] = C + 3                    # batch 1 of 4: differentiated by rank 1
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xv, yv), batch_size=5)
    method = SAflex(pool=3) if kind == "sources" else "saflex"
    refiner = AugmentationRefiner(model, opt, val, method=method, accelerator=acc,
                                  schedule=Schedule(refresh_every=1, budget=None, fresh_batches=None,
                                                    warmup_steps=1 if kind == "val" else 0))
    r = acc.process_index
    rows = slice(r * ROWS, (r + 1) * ROWS)
    errors = []
    for step in range(3):
        kw = {}
        if kind == "sources":
            kw["sources"] = torch.full((ROWS,), 5 if (r == 1 and step == 1) else 1)
        try:
            loss = refiner(model(x[rows]), y[rows], num_original=N_ORIG, **kw)
        except AugplugError as e:
            errors.append(type(e).__name__)
            continue
        errors.append(None)
        opt.zero_grad()
        acc.backward(loss)
        opt.step()
    torch.save({"errors": errors, "v": refiner.state_dict()["v"]}, os.path.join(out_dir, f"badin{r}.pt"))


@pytest.mark.parametrize("kind", ["sources", "val"])
def test_bad_sources_or_validation_batch_on_one_process_is_rejected_on_every_process(tmp_path, kind):
    """Both were checked inside the policy or the refresh on one process only: the other went on into
    a collective, and gloo aborted the job (or it hung)."""
    _launch("_bad_inputs_worker", str(tmp_path), kind)
    ranks = [torch.load(tmp_path / f"badin{r}.pt", weights_only=True) for r in range(WORLD)]
    if kind == "sources":
        assert ranks[1]["errors"] == [None, "ShapeError", None]
        assert ranks[0]["errors"] == [None, "PeerBatchError", None]
    else:   # every refresh reads the bad batch
        assert ranks[1]["errors"][1:] == ["ClassCountMismatchError"] * 2
        assert ranks[0]["errors"][1:] == ["PeerBatchError"] * 2
    for k in (ranks[0]["v"] or {}):
        assert torch.equal(ranks[0]["v"][k], ranks[1]["v"][k])
