"""Errors that mean "the user's input is wrong": the CLI prints them in one line, exit code 2."""


class DeformcliError(Exception):
    """Base of deformcli's user-facing errors; the message names the file, key or shape."""


class CheckpointError(DeformcliError):
    """A checkpoint cannot be read, has an unknown layout, or cannot be written."""


class ModelError(DeformcliError):
    """A model factory (``package.module:function``) cannot be imported or called, or the
    weights do not fit the model it builds."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message ("" when it has none): one-line reports."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else ""
