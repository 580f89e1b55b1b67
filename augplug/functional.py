"""The stateless core, for users who drive their own loop: scores, policies, targets, losses."""
from .contrastive import clip_loss, contrastive_scores, contrastive_targets
from .isda import isda_logits, isda_per_sample_loss
from .methods.l2rw import l2rw_weights
from .methods.saflex import normalize_scores, saflex_targets
from .scores import (class_scores, double_backward_scores, full_scores, last_layer_scores, scoring_mode,
                     validation_gradient)
from .tabular import tabular_cutmix
from .targets import soft_cross_entropy, to_soft_targets, weighted_soft_ce

__all__ = ["class_scores", "full_scores", "last_layer_scores", "double_backward_scores", "validation_gradient",
           "scoring_mode", "saflex_targets", "normalize_scores", "l2rw_weights", "soft_cross_entropy",
           "to_soft_targets", "weighted_soft_ce", "isda_logits", "isda_per_sample_loss", "contrastive_scores",
           "contrastive_targets", "clip_loss", "tabular_cutmix"]
