"""Errors that mean "the user's input is wrong": the CLI prints them in one line, exit code 2."""


class DeformcliError(Exception):
    """Base of deformcli's user-facing errors; the message names the file, key or shape."""


class CheckpointError(DeformcliError):
    """A checkpoint cannot be read, has an unknown layout, or cannot be written."""


class ModelError(DeformcliError):
    """A ``--model`` factory cannot be imported or called, or the weights do not fit it."""
