"""varkernels: fused kernels for the VAR (Variational Alignment with Re-weighting) loss."""

from ._common import VAROutput
from .ops.var_loss import VARLoss, fused_var_loss
from .reference import var_loss_reference

__version__ = "0.1.0"

__all__ = ["VAROutput", "VARLoss", "fused_var_loss", "var_loss_reference", "__version__"]
