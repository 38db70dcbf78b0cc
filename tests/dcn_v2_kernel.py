"""CharlesShang's compiled DCNv2 forward (``_ext.dcn_v2_forward``) played by torchvision's
kernel: the reference for the CenterNet tests, copied into the stand-in as ``_ext.py``."""

import torchvision


def dcn_v2_forward(
    input, weight, bias, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, deformable_group,
):  # fmt: skip
    expected = 2 * deformable_group * kernel_h * kernel_w
    assert offset.shape[1] == expected and mask.shape[1] == expected // 2
    return torchvision.ops.deform_conv2d(
        input, offset, weight, bias, (stride_h, stride_w), (pad_h, pad_w),
        (dilation_h, dilation_w), mask,
    )  # fmt: skip
