"""DB's autograd functions over its compiled kernels (forward only in this stand-in)."""

from torch.autograd import Function
from torch.nn.modules.utils import _pair

# The compiled extension, built by DB's setup.py: missing on a machine without it.
from .. import deform_conv_cpu, deform_conv_cuda


def _backend(tensor):
    return deform_conv_cuda if tensor.is_cuda else deform_conv_cpu


def _output_size(input, weight, stride, padding, dilation):
    sizes = []
    for dim in range(2):
        span = dilation[dim] * (weight.shape[2 + dim] - 1) + 1
        sizes.append((input.shape[2 + dim] + 2 * padding[dim] - span) // stride[dim] + 1)
    return (input.shape[0], weight.shape[0], *sizes)


class DeformConvFunction(Function):
    @staticmethod
    def forward(ctx, input, offset, weight, stride=1, padding=0, dilation=1, groups=1,
                deformable_groups=1, im2col_step=64):  # fmt: skip
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        output = input.new_empty(_output_size(input, weight, stride, padding, dilation))
        _backend(input).deform_conv_forward_cuda(
            input, weight, offset, output, input.new_empty(0), input.new_empty(0),
            weight.size(3), weight.size(2), stride[1], stride[0], padding[1], padding[0],
            dilation[1], dilation[0], groups, deformable_groups,
            min(im2col_step, input.shape[0]),
        )  # fmt: skip
        return output


class ModulatedDeformConvFunction(Function):
    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias=None, stride=1, padding=0, dilation=1,
                groups=1, deformable_groups=1):  # fmt: skip
        with_bias = bias is not None
        if not with_bias:
            bias = input.new_empty(1)
        size = _output_size(input, weight, _pair(stride), _pair(padding), _pair(dilation))
        output = input.new_empty(size)
        _backend(input).modulated_deform_conv_cuda_forward(
            input, weight, bias, input.new_empty(0), offset, mask, output, input.new_empty(0),
            weight.shape[2], weight.shape[3], stride, stride, padding, padding, dilation,
            dilation, groups, deformable_groups, with_bias,
        )  # fmt: skip
        return output


deform_conv = DeformConvFunction.apply
modulated_deform_conv = ModulatedDeformConvFunction.apply
