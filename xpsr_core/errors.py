"""The one error type for checkpoints and configs, so callers (and ComfyUI nodes) can catch it, and the two ways
a foreign library's exception is quoted in one of our messages."""


class CheckpointError(ValueError):
    """A checkpoint or config that cannot be used; the message names the file, the key and what was expected."""


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (its type name when empty): torch, pyiqa and diffusers append pages of
    context that would bury our own sentence around it."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def one_line(e: BaseException) -> str:
    """``e``'s whole message with its line breaks and runs of spaces made single spaces: a node's error box and a
    report line show one line, and transformers' multi-line messages keep their reason further down."""
    return " ".join(str(e).split())
