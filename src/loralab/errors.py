"""The errors a run can end with. Each CLI maps them to one line and an exit code; nothing here imports loralab."""


class ConfigError(ValueError):
    """A config value breaks a rule; the message is one line: key=value: rule."""


class DataError(ValueError):
    """A data file cannot be used at all (missing, empty after validation, leakage with policy=error)."""


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or does not fit the model."""


class ExportError(RuntimeError):
    """An exported model does not reload to the same outputs, or its files do not match their manifest."""


class NonFiniteLossError(RuntimeError):
    """Training produced NaN/Inf; continuing would only write garbage."""


class TrainingInterrupted(RuntimeError):
    """A stop was requested (SIGINT/SIGTERM); ``last`` was written at an optimizer-step boundary."""
