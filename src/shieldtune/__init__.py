"""shieldtune: secure distributed fine-tuning of large language models.

Model slicing, LoRA / P-tuning v2 / SPF adapters, TEE-shielded training and split fine-tuning.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
