"""mmcv's deformable layers (``mmcv.ops``) with mmcv's names, arguments and gradients.

Checked against mmcv/ops/deform_conv.py and mmcv/ops/modulated_deform_conv.py (mmcv 2.x):
constructor arguments, attribute names (``deform_groups``, ``im2col_step``, ``transposed``,
``output_padding``), parameters (``weight``; ``bias`` only on the modulated layers; the
``*Pack`` layers own ``conv_offset``), initialisation, the ``*Pack`` forward
(``o1, o2, mask = chunk(3)``, offset ``cat(o1, o2)``, ``sigmoid(mask)``) and the ``*Pack``
renaming of version-1 checkpoint keys ``<name>_offset.*`` to ``<name>.conv_offset.*`` (here a
function on the whole state_dict, :func:`rename_version1_offset_keys`; see its docstring).
The offset gradient follows mmcv's CUDA kernel (:func:`deformcli.ops.deform_conv2d_mmcv_grad`).
"""

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from deformcli.families._base import (
    DeformableConvBase,
    check_offset_channels,
    split_offset_and_mask,
)
from deformcli.ops.deform_conv import deform_conv2d_mmcv_grad

__all__ = [
    "DeformConv2d",
    "DeformConv2dPack",
    "MmcvArgumentError",
    "ModulatedDeformConv2d",
    "ModulatedDeformConv2dPack",
    "deform_conv2d",
    "modulated_deform_conv2d",
    "rename_version1_offset_keys",
]


class MmcvArgumentError(ValueError, AssertionError):
    """A bad argument that mmcv rejects with ``assert``: a ValueError that is also the
    AssertionError mmcv's own code and tests expect."""


def deform_conv2d(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
    bias: bool = False,
    im2col_step: int = 32,
) -> Tensor:
    """mmcv's functional ``deform_conv2d`` (no bias).

    ``groups`` and ``deform_groups`` must agree with the weight's and offset's shapes; the
    batch must be divisible by ``min(im2col_step, batch)``, as mmcv asserts (the step itself
    changes nothing here).
    """
    if bias:
        raise MmcvArgumentError("mmcv's deform_conv2d has no bias (bias=True is not supported)")
    check_im2col_step(input, im2col_step)
    _check_groups(input, offset, weight, groups, deform_groups)
    return deform_conv2d_mmcv_grad(
        input, offset, weight, None, _pair(stride), _pair(padding), _pair(dilation)
    )


def modulated_deform_conv2d(
    input: Tensor,
    offset: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    deform_groups: int = 1,
) -> Tensor:
    """mmcv's functional ``modulated_deform_conv2d`` (note: mask before weight)."""
    _check_groups(input, offset, weight, groups, deform_groups)
    return deform_conv2d_mmcv_grad(
        input, offset, weight, bias, _pair(stride), _pair(padding), _pair(dilation), mask
    )


def check_im2col_step(input: Tensor, im2col_step: int) -> None:
    """mmcv's DCNv1 processes the batch ``im2col_step`` images at a time and asserts that
    they divide it."""
    batch = input.shape[0] if input.dim() == 4 else 0
    step = min(im2col_step, batch)
    if step > 0 and batch % step != 0:
        raise MmcvArgumentError(
            f"batch size must be divisible by im2col_step (batch {batch}, im2col_step "
            f"{im2col_step})"
        )


def _check_groups(
    input: Tensor, offset: Tensor, weight: Tensor, groups: int, deform_groups: int
) -> None:
    if input.dim() == 4 and weight.dim() == 4 and input.shape[1] != weight.shape[1] * groups:
        raise RuntimeError(
            f"groups={groups} does not match input channels {input.shape[1]} and weight shape "
            f"{list(weight.shape)} (expected input channels = weight.shape[1] * groups)"
        )
    if weight.dim() == 4:
        check_offset_channels(
            offset, weight.shape[2:], deform_groups, f"deform_groups={deform_groups}"
        )


def rename_version1_offset_keys(
    state_dict: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], list[tuple[str, str]]]:
    """mmcv's upgrade of version-1 ``*Pack`` checkpoints: ``<name>_offset.*`` becomes
    ``<name>.conv_offset.*`` wherever ``<name>.weight`` (the layer's own weight) exists.

    mmcv does this inside ``_load_from_state_dict``, which modern torch hands only the keys under
    the layer's own prefix, so the sibling key ``<name>_offset.weight`` never reaches it; as a
    function on the whole state_dict it works with any torch.

    Returns:
        The renamed state_dict (a new dict; the input is untouched) and the ``(old, new)`` pairs.
    """
    renamed: list[tuple[str, str]] = []
    result: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        for suffix in ("_offset.weight", "_offset.bias"):
            base = key[: -len(suffix)]
            candidate = f"{base}.conv_offset.{suffix.rsplit('.', 1)[1]}"
            if (
                key.endswith(suffix)
                and f"{base}.weight" in state_dict
                and candidate not in state_dict
            ):
                new_key = candidate
        if new_key != key:
            renamed.append((key, new_key))
        result[new_key] = value
    return result, renamed


class DeformConv2d(DeformableConvBase):
    """``mmcv.ops.DeformConv2d``: DCNv1, weight only (``bias=True`` is refused, as in mmcv).

    forward(x ``(N, C_in, H, W)``, offset ``(N, 2 * deform_groups * kH * kW, H_out, W_out)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = False,
        im2col_step: int = 32,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        super().__init__()
        if bias:
            raise MmcvArgumentError(f"bias={bias} is not supported in mmcv's DeformConv2d")
        if in_channels % groups != 0 or out_channels % groups != 0:
            raise MmcvArgumentError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must both be "
                f"divisible by groups ({groups})"
            )
        self._init_geometry(
            in_channels,
            out_channels,
            kernel_size,
            _pair(stride),
            _pair(padding),
            _pair(dilation),
            groups,
        )
        # mmcv renames the deprecated ``deformable_groups`` keyword to ``deform_groups``.
        self.deform_groups = deformable_groups if deformable_groups is not None else deform_groups
        self.im2col_step = im2col_step
        self.reset_parameters()

    @property
    def offset_groups(self) -> int:
        return self.deform_groups

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")

    def forward(self, x: Tensor, offset: Tensor) -> Tensor:
        check_im2col_step(x, self.im2col_step)
        return self.deform(x, offset)


class DeformConv2dPack(DeformConv2d):
    """``mmcv.ops.DeformConv2dPack``: predicts its own offset with ``conv_offset``.

    ``conv_offset`` is a zero-initialised ``nn.Conv2d(in_channels, deform_groups * 2 * kH * kW)``
    with the layer's kernel, stride, padding and dilation. forward(x ``(N, C_in, H, W)``).
    """

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = self.make_offset_conv(2)
        self.init_offset()

    def init_offset(self) -> None:
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        check_im2col_step(x, self.im2col_step)
        return self.deform(x, self.conv_offset(x))


class ModulatedDeformConv2d(DeformableConvBase):
    """``mmcv.ops.ModulatedDeformConv2d``: DCNv2 with ``weight`` and optional ``bias``.

    forward(x ``(N, C_in, H, W)``, offset ``(N, 2 * deform_groups * kH * kW, H_out, W_out)``,
    mask ``(N, deform_groups * kH * kW, H_out, W_out)``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool | str = True,
        *,
        deformable_groups: int | None = None,
    ) -> None:
        super().__init__()
        self._init_geometry(
            in_channels,
            out_channels,
            kernel_size,
            _pair(stride),
            _pair(padding),
            _pair(dilation),
            groups,
        )
        self.deform_groups = deformable_groups if deformable_groups is not None else deform_groups
        # mmcv accepts bias="auto" (truthy): the layer then has a bias.
        self.init_bias_parameter(bool(bias))
        self.init_weights()

    @property
    def offset_groups(self) -> int:
        return self.deform_groups

    def init_weights(self) -> None:
        self.uniform_weight_init()

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return self.deform(x, offset, mask)


class ModulatedDeformConv2dPack(ModulatedDeformConv2d):
    """``mmcv.ops.ModulatedDeformConv2dPack`` (registered as ``DCNv2`` in mmcv).

    ``conv_offset`` is a zero-initialised ``nn.Conv2d(in_channels, deform_groups * 3 * kH * kW)``;
    its output is split as ``o1, o2, mask = chunk(3)``, offset ``cat(o1, o2)``, ``sigmoid(mask)``.
    forward(x ``(N, C_in, H, W)``).
    """

    _version = 2

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv_offset = self.make_offset_conv(3)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        self.zero_offset_conv()

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        offset, mask = split_offset_and_mask(self.conv_offset(x))
        return self.deform(x, offset, mask)
