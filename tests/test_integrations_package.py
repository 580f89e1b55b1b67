"""augplug.integrations: the packaged scripts, their console scripts, the checkout shims, and the
Accelerate example's world-size check."""
import configparser
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("timm_train", "accelerate_train", "albumentations_example")


def test_console_scripts_point_at_packaged_clis():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    entries = dict(line.split("=", 1) for line in cfg["options.entry_points"]["console_scripts"].strip().splitlines())
    entries = {k.strip(): v.strip() for k, v in entries.items()}
    for name in SCRIPTS:
        target = entries["augplug-" + name.replace("_", "-")]
        module, func = target.split(":")
        assert module == f"augplug.integrations.{name}" and func == "cli"
        assert (ROOT / "augplug" / "integrations" / f"{name}.py").is_file()
    assert "py.typed" in cfg["options.package_data"]["augplug"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_checkout_shim_is_the_packaged_module(name):
    dep = pytest.importorskip({"timm_train": "timm", "accelerate_train": "accelerate",
                               "albumentations_example": "albumentations"}[name])
    if name == "timm_train":   # the script needs timm's task-state checkpoints; the library and task need less
        from packaging.version import Version
        if Version(dep.__version__) < Version("1.0.27"):
            pytest.skip(f"timm {dep.__version__} < 1.0.27: augplug-timm-train names the version it needs")
    shim = importlib.import_module(f"integrations.{name}")
    assert shim is importlib.import_module(f"augplug.integrations.{name}")
    assert callable(shim.main) and callable(shim.cli)


# ------------------------------------------------------------------------------- world size
def _warn(env, n):
    from augplug.integrations.accelerate_train import world_size_warning
    return world_size_warning(env, n)


LAUNCHED = {"ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO", "ACCELERATE_USE_CPU": "True"}


def test_world_size_agrees():
    pytest.importorskip("accelerate")
    assert _warn({}, 1) is None                                                   # plain python
    assert _warn(dict(LAUNCHED), 1) is None                                       # accelerate launch, 1 process
    assert _warn({**LAUNCHED, "WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "29500"}, 2) is None   # --multi_gpu
    assert _warn({"ACCELERATE_NUM_PROCESSES": "4", "WORLD_SIZE": "4"}, 4) is None
    assert _warn({"MASTER_PORT": "29500"}, 1) is None      # MASTER_PORT alone (not accelerate launch): no guess


def test_cpu_num_processes_runs_one_process_and_says_so():
    """`accelerate launch --cpu --num_processes 2`: MASTER_ADDR/PORT set, no WORLD_SIZE/RANK, one process."""
    pytest.importorskip("accelerate")
    msg = _warn({**LAUNCHED, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1)
    assert msg and "1 process" in msg and "--num_processes" in msg
    assert "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes N" in msg


def test_requested_count_disagrees():
    pytest.importorskip("accelerate")
    msg = _warn({"ACCELERATE_NUM_PROCESSES": "2"}, 1)
    assert msg and "ACCELERATE_NUM_PROCESSES=2" in msg and "has 1" in msg
    msg = _warn({**LAUNCHED, "WORLD_SIZE": "4"}, 2)
    assert msg and "WORLD_SIZE=4" in msg and "has 2" in msg
    # ACCELERATE_NUM_PROCESSES (the user's expectation) is checked before WORLD_SIZE
    assert "ACCELERATE_NUM_PROCESSES=3" in _warn({"ACCELERATE_NUM_PROCESSES": "3", "WORLD_SIZE": "2"}, 2)
    assert "not a number" in _warn({"ACCELERATE_NUM_PROCESSES": "two"}, 1)


def test_launch_cpu_num_processes_2_prints_world_size_and_warns(tmp_path):
    """The command a user types first, for real: one process, the world size printed, a warning on stderr."""
    pytest.importorskip("accelerate")
    pytest.importorskip("sklearn")
    env = dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "ACCELERATE_NUM_PROCESSES"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29519",
           "-m", "augplug.integrations.accelerate_train", "--epochs", "1", "--max-steps", "1", "--no-progress",
           "--output", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "accelerate_train: world size 1" in proc.stdout
    assert "asked for more than one process" in proc.stderr and "--multi_gpu" in proc.stderr
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["num_processes"] == 1 and "asked for more than one process" in res["world_size_warning"]
