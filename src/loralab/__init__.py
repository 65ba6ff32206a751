"""loralab: LoRA fine-tuning of Qwen-class models into classifiers of engineered-feature records."""

__version__ = "0.1.0"
