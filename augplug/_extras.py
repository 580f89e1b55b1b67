"""Optional dependencies, imported with an error that names the extra to install.

``pip install augplug`` installs what the refiner itself needs. Features that need more import it
through :func:`require`, which turns a missing package into a :class:`MissingExtraError` (an
``ImportError``) naming the package, the feature and the ``pip install "augplug[...]"`` command.
The extras are declared in ``setup.cfg``; :data:`EXTRAS` mirrors them.
"""
from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EXTRAS", "MissingExtraError", "require", "pyplot"]

#: extra -> the packages it adds (as in ``setup.cfg``'s ``[options.extras_require]``).
EXTRAS = {
    "demo": ("scikit-learn", "matplotlib"),
    "plot": ("matplotlib",),
    "report": ("pandas", "matplotlib"),
    "albumentations": ("albumentations",),
}

# import name -> distribution name, where they differ
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "PIL": "pillow"}


class MissingExtraError(ImportError):
    """An optional package is not installed. ``module``, ``extra`` and ``feature`` say which, for
    which extra and what needed it; the message holds the command that installs it."""

    def __init__(self, module: str, extra: str, feature: str, reason: str = ""):
        self.module, self.extra, self.feature = module, extra, feature
        top = module.split(".")[0]
        dist = _DISTRIBUTIONS.get(top, top)
        msg = (f"{feature} needs the optional package {dist} (module {module!r}), which could not be imported"
               + (f" ({reason})" if reason else "") +
               f".\n  fix: pip install \"augplug[{extra}]\"  (or: pip install {dist})")
        super().__init__(msg, name=module)


def require(module: str, extra: str, feature: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``extra`` and ``feature``.

    ``feature`` completes "<feature> needs the optional package ...", e.g. ``"AugmentationAudit.table()"``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(module, extra, feature, reason=f"{type(e).__name__}: {e}") from e


def pyplot(extra: str, feature: str) -> ModuleType:
    """``matplotlib.pyplot`` on the non-interactive Agg backend (files only), or :class:`MissingExtraError`."""
    mpl = require("matplotlib", extra, feature)
    mpl.use("Agg")
    return require("matplotlib.pyplot", extra, feature)
