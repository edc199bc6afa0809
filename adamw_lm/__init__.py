"""adamw_lm: a memory-aware AdamW and exactly resumable fine-tuning runs for mlx-lm."""

from .optim import AdamW

__version__ = "0.1.0"

__all__ = ["AdamW", "__version__"]
