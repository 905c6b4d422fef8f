"""The one error type for checkpoints and configs, so callers (and ComfyUI nodes) can catch it."""


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message names the file, the key and what was expected."""
