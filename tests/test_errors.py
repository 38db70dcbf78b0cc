"""deformcli.errors: the user-facing error types and one-line reports."""

import pytest

from deformcli.checkpoint import CheckpointError, PickledObjectsError
from deformcli.errors import DeformcliError, ModelError, first_line
from deformcli.export import ExportError
from deformcli.output_file import OutputExistsError
from deformcli.plot import MatplotlibMissingError
from deformcli.validation import InputError


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (ValueError("shape mismatch\n  at layer 3\n"), "shape mismatch"),
        (RuntimeError("\n\n  leading blank lines\nsecond"), "leading blank lines"),
        (KeyError(), ""),
        (RuntimeError("   "), ""),
    ],
)
def test_first_line(error, line):
    assert first_line(error) == line


@pytest.mark.parametrize(
    "error_type",
    [
        CheckpointError,
        PickledObjectsError,
        ModelError,
        InputError,
        ExportError,
        OutputExistsError,
        MatplotlibMissingError,
    ],
)
def test_every_user_facing_error_is_a_deformcli_error(error_type):
    # The CLI prints exactly these as one line with exit code 2, never as a traceback.
    assert issubclass(error_type, DeformcliError)
