"""Moved to :mod:`augplug.integrations.timm_train` (installed with the package); this file keeps
``python integrations/timm_train.py`` working in a checkout, and importing it gives the packaged module."""
import importlib
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    importlib.import_module("augplug.integrations.timm_train").cli()
else:
    sys.modules[__name__] = importlib.import_module("augplug.integrations.timm_train")
