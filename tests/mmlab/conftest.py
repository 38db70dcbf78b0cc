"""The mmlab group: real mmengine, mmcv-lite, mmdet and mmocr (the README's pin set).

Run alone with ``python -m pytest -m mmlab``; skipped where the packages are not installed.
"""

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _imgaug_on_numpy_2():
    """mmocr imports imgaug 0.4.0, which reads ``np.sctypes`` (removed in numpy 2): their bug,
    patched here for the tests only (the README tells users to do the same or pin numpy<2)."""
    if "sctypes" not in np.__dict__:
        np.sctypes = {
            "int": [np.int8, np.int16, np.int32, np.int64],
            "uint": [np.uint8, np.uint16, np.uint32, np.uint64],
            "float": [np.float16, np.float32, np.float64, np.longdouble],
            "complex": [np.complex64, np.complex128, np.clongdouble],
            "others": [bool, object, bytes, str, np.void],
        }
    pytest.importorskip("mmengine")
    pytest.importorskip("mmdet")
    pytest.importorskip("mmocr")
