"""The VAR loss on the core: weights (weights.py) → per-token coefficients → core (loss.py)."""

from .loss import VARLoss, fused_linear_var_loss, fused_var_loss, sequence_coefficients
from .weights import group_ess, var_weights

__all__ = ["VARLoss", "fused_var_loss", "fused_linear_var_loss", "sequence_coefficients", "var_weights",
           "group_ess"]
