"""augplug: adaptive refinement of augmented samples against a clean validation set.

    refiner = augplug.AugmentationRefiner(model, optimizer, val_loader, method="saflex")
    loss = refiner(logits, targets)
"""

__version__ = "0.1.0"

from . import functional
from .checks import validate
from .errors import (AugplugError, ClassCountMismatchError, ConfigurationError, EmptyValidationError,
                     ModelModeError, NonFiniteError, ShapeError, TargetError, UnsupportedHeadError,
                     UnsupportedModelError, ValidationFailed)
from .heads import find_classifier, unwrap_model
from .isda import ISDALoss
from .methods import L2RW, SAFLEX_PAPER, NoRefinement, Policy, RefineContext, SAflex
from .refiner import DEFAULTS, AugmentationRefiner

__all__ = ["__version__", "AugmentationRefiner", "DEFAULTS", "SAFLEX_PAPER", "functional", "Policy", "RefineContext", "SAflex", "L2RW", "ISDALoss",
           "NoRefinement", "find_classifier", "unwrap_model", "validate", "AugplugError", "ConfigurationError",
           "UnsupportedHeadError", "UnsupportedModelError", "TargetError", "ClassCountMismatchError",
           "ShapeError", "NonFiniteError", "EmptyValidationError", "ModelModeError", "ValidationFailed"]
