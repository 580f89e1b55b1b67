"""Learned, differentiable augmentations.

- :mod:`augplug.augment.affine`: AutoDO's per-sample affine operations with learned gates and magnitudes.
- :mod:`augplug.augment.augnet`: the augmentation network trained through influence functions.

Import the submodule you need; nothing is imported here so that each stays optional.
"""
