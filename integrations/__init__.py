"""Checkout shims: the scripts live in :mod:`augplug.integrations` (installed with the package)."""
