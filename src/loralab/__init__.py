"""loralab: LoRA fine-tuning of Qwen-class models into classifiers of engineered-feature records."""

from loralab.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()  # the configs' ${loralab.cwd:} must resolve wherever loralab is imported
