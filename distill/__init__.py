"""distill: targeted knowledge distillation for sentiment analysis.

Stays light on import: deepspeed, ray and triton are imported only where they are used.
"""

__version__ = "0.1.0"
