"""Moved to :mod:`augplug.integrations.albumentations_example` (installed with the package); this file keeps
``python integrations/albumentations_example.py`` working in a checkout, and importing it gives the packaged module."""
import importlib
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    importlib.import_module("augplug.integrations.albumentations_example").cli()
else:
    sys.modules[__name__] = importlib.import_module("augplug.integrations.albumentations_example")
