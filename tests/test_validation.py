"""deformcli.validation: values from the user are checked, and named, before any work."""

import pytest
import torch

from deformcli import validation
from deformcli.validation import (
    DTYPES,
    InputError,
    check_allocation,
    parse_device,
    parse_dtype,
    parse_shape,
)


def test_parse_dtype_knows_the_floating_dtypes_only():
    assert {name: parse_dtype(name) for name in DTYPES} == {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float64": torch.float64,
    }
    for name in ("int64", "torch.float32", "float", "complex64"):
        with pytest.raises(InputError, match=f"dtype '{name}': choose from float32, float16"):
            parse_dtype(name)


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(InputError, match="device 'gpu0': not a device torch knows"):
        parse_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="device 'cuda': no CUDA device is available"):
            parse_device("cuda")
    else:
        count = torch.cuda.device_count()
        with pytest.raises(InputError, match=f"this machine has {count} CUDA device"):
            parse_device(f"cuda:{count}")


@pytest.mark.parametrize(
    ("text", "shape"), [("1,3,640,640", (1, 3, 640, 640)), ("2x3x64x32", (2, 3, 64, 32))]
)
def test_parse_shape(text, shape):
    assert parse_shape(text, "--input-shape") == shape


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,3,a,4", "--input-shape '1,3,a,4': expected 4 integers like 1,3,640,640"),
        ("1,3,64", "--input-shape '1,3,64': expected 4 sizes (N,C,H,W) like 1,3,640,640, got 3"),
        ("1,0,64,64", "--input-shape '1,0,64,64': every size must be between 1 and 2147483647"),
        ("1,3,-4,64", "every size must be between 1 and"),
        ("1,3,2147483648,1", "every size must be between 1 and"),
    ],
)
def test_parse_shape_names_the_value_and_what_it_is(text, message):
    with pytest.raises(InputError) as raised:
        parse_shape(text, "--input-shape")
    assert message in str(raised.value)


def test_check_allocation_refuses_what_this_machine_cannot_hold(monkeypatch):
    monkeypatch.setattr(validation, "_memory_bytes", lambda: 4 * 2**30)  # a 4 GiB machine
    check_allocation((1, 3, 640, 640), torch.float32, "input shape")
    check_allocation((2**28,), torch.float32, "input shape")  # 1 GiB: a quarter, allowed
    with pytest.raises(InputError) as raised:
        check_allocation((2**28 + 1,), torch.float32, "input shape")
    assert str(raised.value) == (
        "input shape [268435457]: needs 1.0 GiB for this tensor alone, more than a quarter of "
        "this machine's memory (4.0 GiB)"
    )
    with pytest.raises(InputError, match=r"needs 2\.0 GiB"):
        check_allocation((2**28 + 1,), torch.float64, "input shape")


@pytest.mark.parametrize("shape", [(1, 0, 4), (1, -2, 4), (1, 2.5, 4)])
def test_check_allocation_refuses_sizes_that_are_not_positive_ints(shape):
    with pytest.raises(InputError, match="every size must be between 1 and 2147483647"):
        check_allocation(shape, torch.float32, "layer shape")
