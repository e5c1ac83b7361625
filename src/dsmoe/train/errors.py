"""The training error type, shared by the loop and its preparation steps."""


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, unusable resume state, refused settings); the message says why."""
