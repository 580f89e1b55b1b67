"""Optional packages: a missing one raises MissingExtraError naming the package, the feature and the
``pip install "augplug[extra]"`` that installs it (imports made to fail by a ``None`` in sys.modules)."""
import configparser
import os
import sys
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from augplug._extras import EXTRAS, MissingExtraError, pyplot, require  # noqa: E402
from augplug.report import AugmentationAudit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch, *modules):
    for m in modules:
        monkeypatch.setitem(sys.modules, m, None)   # `import m` now raises ImportError


def _check(err, module, extra, feature):
    assert isinstance(err, ImportError) and isinstance(err, MissingExtraError)
    assert (err.module, err.extra) == (module, extra) and feature in err.feature
    msg = str(err)
    assert f'pip install "augplug[{extra}]"' in msg and feature in msg and repr(module) in msg


def test_require_returns_the_module_or_names_the_extra(monkeypatch):
    assert require("json", "demo", "x").dumps([1]) == "[1]"
    _hide(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingExtraError) as e:
        require("sklearn.datasets", "demo", "the demo's digits data")
    _check(e.value, "sklearn.datasets", "demo", "the demo's digits data")
    assert "pip install scikit-learn" in str(e.value)            # the distribution name, not the module's
    assert isinstance(e.value.__cause__, ImportError)


def test_extras_match_setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = {k: {line.split(">")[0].split("<")[0].split("=")[0].strip() for line in v.strip().splitlines()}
                for k, v in cfg["options.extras_require"].items()}
    for extra, packages in EXTRAS.items():
        assert set(packages) == declared[extra], extra
    for extra in EXTRAS:                          # dev installs everything every extra does
        assert declared[extra] <= declared["dev"] and declared[extra] <= declared["all"]


def _audit():
    audit = AugmentationAudit(["a", "b"])
    w = torch.tensor([1.0, 0.5, 0.0])
    stats = {"weights": w, "augmented": torch.ones(3, dtype=torch.bool), "soft_targets": torch.eye(2)[[0, 1, 1]],
             "active": True}
    assert audit.update(stats, ["Rotate", "Flip", "Rotate|Flip"], torch.tensor([0, 1, 0]))
    return audit


def test_audit_table_without_pandas_names_report_extra(monkeypatch):
    audit = _audit()
    _hide(monkeypatch, "pandas")
    with pytest.raises(MissingExtraError) as e:
        audit.table()
    _check(e.value, "pandas", "report", "AugmentationAudit.table(format='pandas')")
    assert audit.table(format="markdown")          # the other formats need nothing
    assert audit.table(format="records")


def test_audit_plot_without_matplotlib_names_plot_extra(monkeypatch, tmp_path):
    audit = _audit()
    _hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtraError) as e:
        audit.plot(tmp_path / "a.png")
    _check(e.value, "matplotlib", "plot", "AugmentationAudit.plot()")
    assert not (tmp_path / "a.png").exists()


@pytest.fixture
def demo_without_training(monkeypatch):
    from augplug.demo import cli as demo

    def no_training(*a, **kw):
        raise AssertionError("trained although a package is missing")

    monkeypatch.setattr(demo, "run_arm", no_training)
    return demo


def test_demo_without_sklearn_fails_before_training(monkeypatch, tmp_path, demo_without_training):
    _hide(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingExtraError) as e:
        demo_without_training.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    _check(e.value, "sklearn.datasets", "demo", "the demo's digits data")
    with pytest.raises(MissingExtraError):
        demo_without_training.load_digits_study(0)


def test_demo_without_matplotlib_fails_before_training(monkeypatch, tmp_path, demo_without_training):
    _hide(monkeypatch, "matplotlib", "matplotlib.pyplot")
    with pytest.raises(MissingExtraError) as e:
        demo_without_training.main(["--seeds", "0", "--epochs", "1", "--out", str(tmp_path)])
    _check(e.value, "matplotlib", "demo", "the demo's plot")


def test_integration_data_without_sklearn_names_demo_extra(monkeypatch):
    from augplug.integrations import datasets

    _hide(monkeypatch, "sklearn", "sklearn.datasets")
    with pytest.raises(MissingExtraError) as e:
        datasets.load_digits_u8("augplug-timm-train --dataset digits")
    _check(e.value, "sklearn.datasets", "demo", "augplug-timm-train --dataset digits")


def test_albumentations_example_without_albumentations_names_its_extra(monkeypatch):
    ex = pytest.importorskip("augplug.integrations.albumentations_example")
    _hide(monkeypatch, "albumentations", "albumentations.pytorch")
    with pytest.raises(MissingExtraError) as e:
        ex.build_pipeline()
    _check(e.value, "albumentations", "albumentations", "the albumentations example")


def test_pyplot_uses_agg(tmp_path):
    plt = pyplot("plot", "a test")
    assert plt.get_backend().lower() == "agg"
