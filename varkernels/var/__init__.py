"""The VAR loss: VAR weights (weights.py) → the weighted NLL of varkernels/nll.py (loss.py)."""

from .loss import VARLoss, fused_linear_var_loss, fused_var_loss
from .weights import group_ess, var_weights

__all__ = ["VARLoss", "fused_var_loss", "fused_linear_var_loss", "var_weights", "group_ess"]
