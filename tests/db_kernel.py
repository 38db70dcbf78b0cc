"""DB's compiled DCN forward (mmdetection v1's ``deform_conv_cuda.cpp``), played by torchvision's
kernel: the reference for the DB tests.

Copied into the DB stand-in as ``assets/ops/dcn/deform_conv_cuda.py`` and ``deform_conv_cpu.py``
it makes DB's model code run as it does on the training GPU. It follows the C++ entry points'
pointer arithmetic, not their tensor shapes:

- ``modulated_deform_conv_cuda_forward`` checks nothing about offset and mask. For each sample
  ``b`` it hands the data pointers of ``offset[b]`` and ``mask[b]`` to im2col, which reads
  ``2 * dg * kH * kW * H_out * W_out`` (mask: ``dg * kH * kW * H_out * W_out``) consecutive
  values from there as an ``(channels, H_out, W_out)`` block, whatever the tensor's shape.
  Here: ``as_strided`` over the tensor's storage from the same element.
- ``deform_conv_forward_cuda`` runs ``shape_check``, which rejects an offset whose spatial size
  is not the output's.
"""

import torch
import torchvision


def sample_read(tensor: torch.Tensor, sample: int, channels: int, height: int, width: int):
    """The ``(channels, height, width)`` block im2col reads from ``tensor[sample].data_ptr()``."""
    start = tensor.storage_offset() + sample * tensor.stride(0)
    return torch.as_strided(tensor, (channels, height, width), (height * width, width, 1), start)


def modulated_deform_conv_cuda_forward(
    input, weight, bias, ones, offset, mask, output, columns, kernel_h, kernel_w, stride_h,
    stride_w, pad_h, pad_w, dilation_h, dilation_w, group, deformable_group, with_bias,
):  # fmt: skip
    assert input.is_contiguous() and weight.is_contiguous()
    out_h, out_w = output.shape[2:]
    points = deformable_group * kernel_h * kernel_w
    for b in range(input.shape[0]):
        output[b] = torchvision.ops.deform_conv2d(
            input[b : b + 1],
            sample_read(offset, b, 2 * points, out_h, out_w)[None],
            weight,
            bias if with_bias else None,
            (stride_h, stride_w),
            (pad_h, pad_w),
            (dilation_h, dilation_w),
            sample_read(mask, b, points, out_h, out_w)[None],
        )[0]


def deform_conv_forward_cuda(
    input, weight, offset, output, columns, ones, kernel_w, kernel_h, stride_w, stride_h, pad_w,
    pad_h, dilation_w, dilation_h, group, deformable_group, im2col_step,
):  # fmt: skip
    out_h, out_w = output.shape[2:]
    if tuple(offset.shape[2:]) != (out_h, out_w):
        raise RuntimeError(
            f"invalid spatial size of offset, expected height: {out_h} width: {out_w}, but got "
            f"height: {offset.shape[2]} width: {offset.shape[3]}"
        )
    output.copy_(
        torchvision.ops.deform_conv2d(
            input,
            offset,
            weight,
            None,
            (stride_h, stride_w),
            (pad_h, pad_w),
            (dilation_h, dilation_w),
        )
    )
