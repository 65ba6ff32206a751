"""loralab: LoRA fine-tuning of Qwen-class models into classifiers of engineered-feature records."""

import warnings

from loralab.paths import register_resolvers

__version__ = "0.1.0"

register_resolvers()  # the configs' ${loralab.cwd:} must resolve wherever loralab is imported
# peft probes `model.is_gradient_checkpointing`, an alias transformers 5 deprecated: a warning about the seam between
# the two libraries on every adapter load, with nothing the user can change
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
