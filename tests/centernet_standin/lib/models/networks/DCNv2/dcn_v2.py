"""CharlesShang's DCNv2 (PyTorch 1.x branch) as CenterNet-style projects vendor it."""

import math

import _ext as _backend  # the compiled extension: missing on a machine without it
import torch
from torch import nn
from torch.autograd import Function
from torch.nn.modules.utils import _pair


class _DCNv2(Function):
    @staticmethod
    def forward(ctx, input, offset, mask, weight, bias, stride, padding, dilation, groups):
        stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
        kernel = weight.shape[2:4]
        return _backend.dcn_v2_forward(
            input, weight, bias, offset, mask, kernel[0], kernel[1], stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1], groups,
        )  # fmt: skip


dcn_v2_conv = _DCNv2.apply


class DCNv2(nn.Module):
    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation=1,
                 deformable_groups=1):  # fmt: skip
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        self.deformable_groups = deformable_groups
        self.weight = nn.Parameter(torch.Tensor(out_channels, in_channels, *self.kernel_size))
        self.bias = nn.Parameter(torch.Tensor(out_channels))
        self.reset_parameters()

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        self.weight.data.uniform_(-bound, bound)
        self.bias.data.zero_()

    def forward(self, input, offset, mask):
        return dcn_v2_conv(input, offset, mask, self.weight, self.bias, self.stride,
                           self.padding, self.dilation, self.deformable_groups)  # fmt: skip


class DCN(DCNv2):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels = self.deformable_groups * 3 * self.kernel_size[0] * self.kernel_size[1]
        self.conv_offset_mask = nn.Conv2d(
            self.in_channels, channels, self.kernel_size, self.stride, self.padding, bias=True
        )
        self.conv_offset_mask.weight.data.zero_()
        self.conv_offset_mask.bias.data.zero_()

    def forward(self, input):
        o1, o2, mask = torch.chunk(self.conv_offset_mask(input), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        mask = torch.sigmoid(mask)
        return dcn_v2_conv(input, offset, mask, self.weight, self.bias, self.stride,
                           self.padding, self.dilation, self.deformable_groups)  # fmt: skip


class DCNv2Pooling(nn.Module):
    def __init__(self, spatial_scale, pooled_size, output_dim, no_trans, group_size=1,
                 part_size=None, sample_per_part=4, trans_std=0.0):  # fmt: skip
        super().__init__()
        self.spatial_scale, self.pooled_size, self.output_dim = (
            spatial_scale,
            pooled_size,
            output_dim,
        )
