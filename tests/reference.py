"""An independent, slow reference for deformable convolution, written from the definition.

One loop per output pixel, kernel point and offset group; bilinear interpolation where each of
the four corners outside the image contributes zero. Differentiable through torch ops, so its
gradients serve as a reference too. Only for tiny shapes.
"""

import math

import torch
from torch import Tensor


def bilinear(image: Tensor, y: Tensor, x: Tensor) -> Tensor:
    """Sample ``image`` ``(C, H, W)`` at the real point ``(y, x)``: a ``(C,)`` vector."""
    _, height, width = image.shape
    y_low = math.floor(y.item())
    x_low = math.floor(x.item())
    frac_y = y - y_low
    frac_x = x - x_low
    value = image.new_zeros(image.shape[0])
    for corner_y, weight_y in ((y_low, 1 - frac_y), (y_low + 1, frac_y)):
        for corner_x, weight_x in ((x_low, 1 - frac_x), (x_low + 1, frac_x)):
            if 0 <= corner_y < height and 0 <= corner_x < width:
                value = value + weight_y * weight_x * image[:, corner_y, corner_x]
    return value


def deform_conv2d_loop(
    input: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: tuple[int, int] = (1, 1),
    padding: tuple[int, int] = (0, 0),
    dilation: tuple[int, int] = (1, 1),
    mask: Tensor | None = None,
) -> Tensor:
    batch, in_channels, height, width = input.shape
    out_channels, group_in_channels, kernel_h, kernel_w = weight.shape
    groups = in_channels // group_in_channels
    kernel_points = kernel_h * kernel_w
    offset_groups = offset.shape[1] // (2 * kernel_points)
    channels_per_offset_group = in_channels // offset_groups
    group_out_channels = out_channels // groups
    out_h = (height + 2 * padding[0] - dilation[0] * (kernel_h - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kernel_w - 1) - 1) // stride[1] + 1

    rows = []
    for n in range(batch):
        out_pixels = []
        for oy in range(out_h):
            for ox in range(out_w):
                # columns[c, i, j]: the (modulated) sample of channel c at kernel point (i, j)
                columns = []
                for g in range(offset_groups):
                    channels = input[
                        n, g * channels_per_offset_group : (g + 1) * channels_per_offset_group
                    ]
                    samples = []
                    for i in range(kernel_h):
                        for j in range(kernel_w):
                            k = g * kernel_points + i * kernel_w + j
                            y = (
                                oy * stride[0]
                                - padding[0]
                                + i * dilation[0]
                                + offset[n, 2 * k, oy, ox]
                            )
                            x = (
                                ox * stride[1]
                                - padding[1]
                                + j * dilation[1]
                                + offset[n, 2 * k + 1, oy, ox]
                            )
                            sample = bilinear(channels, y, x)
                            if mask is not None:
                                sample = sample * mask[n, k, oy, ox]
                            samples.append(sample)
                    columns.append(torch.stack(samples, dim=1).view(-1, kernel_h, kernel_w))
                columns = torch.cat(columns, dim=0)
                pixel = []
                for gr in range(groups):
                    w = weight[gr * group_out_channels : (gr + 1) * group_out_channels]
                    c = columns[gr * group_in_channels : (gr + 1) * group_in_channels]
                    pixel.append((w * c).sum(dim=(1, 2, 3)))
                out_pixels.append(torch.cat(pixel))
        rows.append(torch.stack(out_pixels, dim=1).view(out_channels, out_h, out_w))
    out = torch.stack(rows) if rows else input.new_zeros(0, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out
