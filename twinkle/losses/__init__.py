"""Loss functions: Tinker's losses with their exact summed math, plus Twinkle's named losses.

`specs` (no torch) says what each loss takes; `functions` holds the math.
"""

from twinkle.losses.specs import CUSTOM_LOSS, LOSS_SPECS, LossSpec, loss_names

__all__ = ["CUSTOM_LOSS", "LOSS_SPECS", "LossSpec", "loss_names"]
