"""The built wheel, installed with only its declared ``[demo]`` extra into a fresh virtual environment
(outside the checkout), runs ``augplug demo`` (shortened) and the packaged integration scripts.

Slow (a few minutes: installing torch into the new environment takes most of it) but part of
``make test``. torch and torchvision are pinned to the versions of the environment running the
tests (requirements-dev.txt), so pip reuses the same builds; ``AUGPLUG_WHEEL_TEST_TORCH`` replaces
those requirements (e.g. ``"torch==2.14.1+cpu torchvision==0.29.1+cpu"``) and
``AUGPLUG_WHEEL_TEST_PIP_ARGS`` adds pip options (e.g. ``"--extra-index-url
https://download.pytorch.org/whl/cpu"``). ``AUGPLUG_SKIP_WHEEL_TEST=1`` skips the test.
"""
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib import metadata, util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("augplug", "setup.cfg", "setup.py", "README.md", "LICENSE")
SCRIPTS = ("augplug", "augplug-timm-train", "augplug-accelerate-train", "augplug-albumentations-example")

pytestmark = pytest.mark.skipif(os.environ.get("AUGPLUG_SKIP_WHEEL_TEST") == "1", reason="AUGPLUG_SKIP_WHEEL_TEST=1")


def _run(cmd, timeout, **kw):
    t0 = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    print(f"[{time.perf_counter() - t0:6.1f} s] {' '.join(map(str, cmd))[:160]}")
    return proc


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-5000:]}"
    return proc


def _torch_requirements():
    if os.environ.get("AUGPLUG_WHEEL_TEST_TORCH"):
        return shlex.split(os.environ["AUGPLUG_WHEEL_TEST_TORCH"])
    return [f"torch=={metadata.version('torch')}", f"torchvision=={metadata.version('torchvision')}"]


def _build_wheel(work: Path) -> Path:
    """Build from a copy of the package sources (not the checkout: no stale build/ folder, no shims)."""
    src = work / "src"
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        else:
            shutil.copy2(p, src / name)
    # the running environment's setuptools when it has one (no download); else pip's isolated build
    no_isolation = ["--no-build-isolation"] if util.find_spec("setuptools") else []
    _ok(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", *no_isolation, "-q", str(src),
              "-w", str(work / "dist")], timeout=600))
    wheels = list((work / "dist").glob("augplug-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def _check_wheel_contents(wheel: Path):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
        meta = z.read(f"{dist_info}/METADATA").decode()
    for module in ("py.typed", "_extras.py", "integrations/__init__.py", "integrations/timm_train.py",
                   "integrations/timm_task.py",
                   "integrations/accelerate_train.py", "integrations/albumentations_example.py",
                   "integrations/datasets.py"):
        assert f"augplug/{module}" in names, module
    assert any(n.startswith(dist_info) and n.endswith("LICENSE") for n in names)
    assert not any(n.split("/")[0] in ("tests", "benchmarks", "integrations") for n in names)
    for script in SCRIPTS:
        assert f"{script} = " in entry_points, script
    for extra in ("demo", "plot", "report", "albumentations"):
        assert f"Provides-Extra: {extra}" in meta, extra
    assert "License: MIT" in meta or "License-Expression: MIT" in meta


@pytest.mark.timeout(1800)
def test_wheel_in_fresh_venv_runs_demo_and_integrations():
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="augplug_wheel_"))   # removed below: the venv holds GBs of torch
    try:
        wheel = _build_wheel(work)
        _check_wheel_contents(wheel)

        venv = work / "venv"
        _ok(_run([sys.executable, "-m", "venv", str(venv)], timeout=300))
        bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
        py = bin_dir / "python"
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        env.update(NO_ALBUMENTATIONS_UPDATE="1", PIP_NO_INPUT="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
                   MPLBACKEND="Agg", VIRTUAL_ENV=str(venv), PATH=str(bin_dir) + os.pathsep + env.get("PATH", ""))
        pip_args = shlex.split(os.environ.get("AUGPLUG_WHEEL_TEST_PIP_ARGS", ""))
        _ok(_run([py, "-m", "pip", "install", "-q", f"{wheel}[demo]", *_torch_requirements(), *pip_args],
                 timeout=1200, env=env, cwd=work))

        run = dict(env=env, cwd=work)   # outside the checkout: only the installed package can be imported
        where = _ok(_run([py, "-c", "import augplug, importlib.resources as r; print(augplug.__file__); "
                                    "print(r.files('augplug').joinpath('py.typed').is_file())"], 120, **run))
        origin, typed = where.stdout.split()
        assert Path(origin).resolve().is_relative_to(venv.resolve()) and typed == "True"
        for script in SCRIPTS:
            assert (bin_dir / script).exists(), script

        # augplug demo, shortened: one seed, two epochs
        demo = _ok(_run([bin_dir / "augplug", "demo", "--seeds", "0", "--epochs", "2", "--out", work / "demo"],
                        300, **run))
        assert "| upstream+SAflex |" in demo.stdout
        for f in ("results.md", "results.json", "demo.png"):
            assert (work / "demo" / f).stat().st_size > 0, f
        assert set(json.loads((work / "demo" / "results.json").read_text())) == {
            "none", "upstream", "upstream+SAflex", "upstream+L2RW"}

        # the timm integration's console script: digits, a timm test model, three updates, the audit
        _ok(_run([bin_dir / "augplug-timm-train", "--dataset", "digits", "--model", "test_resnet", "--img-size", "16",
                  "-b", "32", "--epochs", "1", "--max-steps", "3", "--val-split", "100", "--val-batch-size", "200",
                  "--aa", "rand-m9-mstd0.5", "--audit", "--refiner", "saflex", "--strength", "1", "--device", "cpu",
                  "--output", work / "timm", "--experiment", "run"], 300, **run))
        timm_run = work / "timm" / "run"      # timm's layout: <output>/<experiment>/
        with open(timm_run / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 1 and float(rows[0]["eval_test_top1"]) >= 0
        for name in ("audit.md", "audit.png", "args.yaml", "last.pth.tar", "model_best.pth.tar"):
            assert (timm_run / name).exists(), name
        _ok(_run([py, "-c", "from augplug.integrations.timm_task import RefinedClassificationTask"], 120, **run))

        # the Accelerate example without a launcher: prints the world size
        acc = _ok(_run([bin_dir / "augplug-accelerate-train", "--cpu", "--epochs", "1", "--max-steps", "2",
                        "--output", work / "acc"], 300, **run))
        assert "accelerate_train: world size 1" in acc.stdout
        assert json.loads((work / "acc" / "results.json").read_text())["num_processes"] == 1

        # an extra that was not installed fails with the command that installs it
        has_pandas = _run([py, "-c", "import importlib.util as u; print(u.find_spec('pandas') is not None)"], 60, **run)
        if _ok(has_pandas).stdout.strip() == "False":
            proc = _run([py, "-c", "from augplug.report import AugmentationAudit; AugmentationAudit().table()"], 120,
                        **run)
            assert proc.returncode != 0 and 'pip install "augplug[report]"' in proc.stderr, proc.stderr[-2000:]
    finally:
        shutil.rmtree(work, ignore_errors=True)
        print(f"wheel test: {time.perf_counter() - t_start:.1f} s in all")
