"""augplug: adaptive refinement of augmented samples against a clean validation set.

    refiner = augplug.AugmentationRefiner(model, optimizer, val_loader, method="saflex")
    loss = refiner(logits, targets)
"""

__version__ = "0.1.0"

from . import functional
from .checks import validate
from .errors import (AugplugError, ClassCountMismatchError, ConfigurationError, EmptyValidationError,
                     ModelModeError, NonFiniteError, PeerBatchError, ShapeError, TargetError,
                     UnsupportedHeadError, UnsupportedModelError, ValidationFailed)
from .heads import find_classifier, unwrap_model
from .isda import ISDALoss
from .methods import (L2RW, SAFLEX_PAPER, NoRefinement, Policy, RefineContext, SAflex, create_policy, list_policies,
                      register_policy)
from .refiner import DEFAULTS, AugmentationRefiner, refiner_kwargs
from .schedule import Schedule

__all__ = ["__version__", "AugmentationRefiner", "DEFAULTS", "Schedule", "refiner_kwargs", "create_policy",
           "register_policy", "list_policies", "SAFLEX_PAPER", "functional", "Policy", "RefineContext", "SAflex", "L2RW", "ISDALoss",
           "NoRefinement", "find_classifier", "unwrap_model", "validate", "AugplugError", "ConfigurationError",
           "UnsupportedHeadError", "UnsupportedModelError", "TargetError", "ClassCountMismatchError",
           "ShapeError", "NonFiniteError", "EmptyValidationError", "ModelModeError", "PeerBatchError",
           "ValidationFailed"]
