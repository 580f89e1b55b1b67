"""The stateless core, for users who drive their own loop: scores, policies, targets, losses."""
from .methods.l2rw import l2rw_weights
from .methods.saflex import normalize_scores, saflex_targets
from .scores import (class_scores, double_backward_scores, full_scores, last_layer_scores, scoring_mode,
                     validation_gradient)
from .targets import soft_cross_entropy, to_soft_targets, weighted_soft_ce

__all__ = ["class_scores", "full_scores", "last_layer_scores", "double_backward_scores", "validation_gradient",
           "scoring_mode", "saflex_targets", "normalize_scores", "l2rw_weights", "soft_cross_entropy",
           "to_soft_targets", "weighted_soft_ce"]
