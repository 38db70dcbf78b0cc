"""A small CenterNet-style network: DLA's DeformConv (DCN + BatchNorm + ReLU) in IDAUp."""

import math

import torch
from torch import nn

from .DCNv2.dcn_v2 import DCN

BN_MOMENTUM = 0.1


class DeformConv(nn.Module):
    def __init__(self, chi, cho):
        super().__init__()
        self.actf = nn.Sequential(nn.BatchNorm2d(cho, momentum=BN_MOMENTUM), nn.ReLU(inplace=True))
        self.conv = DCN(chi, cho, kernel_size=(3, 3), stride=1, padding=1, dilation=1,
                        deformable_groups=1)  # fmt: skip

    def forward(self, x):
        return self.actf(self.conv(x))


def fill_up_weights(up):
    weight = up.weight.data
    f = math.ceil(weight.size(2) / 2)
    c = (2 * f - 1 - f % 2) / (2.0 * f)
    for i in range(weight.size(2)):
        for j in range(weight.size(3)):
            weight[0, 0, i, j] = (1 - math.fabs(i / f - c)) * (1 - math.fabs(j / f - c))
    for channel in range(1, weight.size(0)):
        weight[channel, 0, :, :] = weight[0, 0, :, :]


class IDAUp(nn.Module):
    def __init__(self, o, channels, up_f):
        super().__init__()
        for i in range(1, len(channels)):
            c, f = channels[i], int(up_f[i])
            proj = DeformConv(c, o)
            node = DeformConv(o, o)
            up = nn.ConvTranspose2d(o, o, f * 2, stride=f, padding=f // 2, output_padding=0,
                                    groups=o, bias=False)  # fmt: skip
            fill_up_weights(up)
            setattr(self, "proj_" + str(i), proj)
            setattr(self, "up_" + str(i), up)
            setattr(self, "node_" + str(i), node)

    def forward(self, layers, startp, endp):
        for i in range(startp + 1, endp):
            upsample = getattr(self, "up_" + str(i - startp))
            project = getattr(self, "proj_" + str(i - startp))
            layers[i] = upsample(project(layers[i]))
            node = getattr(self, "node_" + str(i - startp))
            layers[i] = node(layers[i] + layers[i - 1])


class TinyDLASeg(nn.Module):
    """Three levels (strides 1, 2, 4 of the stem) fused by IDAUp, then CenterNet's heads."""

    def __init__(self, heads, head_conv=16, channels=(16, 32, 64)):
        super().__init__()
        self.heads = heads
        self.base = nn.ModuleList()
        previous = 3
        for index, width in enumerate(channels):
            stride = 2 if index else 1
            self.base.append(nn.Sequential(
                nn.Conv2d(previous, width, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(width, momentum=BN_MOMENTUM),
                nn.ReLU(inplace=True),
            ))  # fmt: skip
            previous = width
        self.ida_up = IDAUp(channels[0], list(channels), [2**i for i in range(len(channels))])
        for head, classes in heads.items():
            layer = nn.Sequential(
                nn.Conv2d(channels[0], head_conv, 3, padding=1, bias=True),
                nn.ReLU(inplace=True),
                nn.Conv2d(head_conv, classes, 1, bias=True),
            )
            if "hm" in head:
                layer[-1].bias.data.fill_(-2.19)
            self.__setattr__(head, layer)

    def forward(self, x):
        levels = []
        for stage in self.base:
            x = stage(x)
            levels.append(x)
        self.ida_up(levels, 0, len(levels))
        return [{head: self.__getattr__(head)(levels[-1]) for head in self.heads}]


def get_pose_net(num_layers, heads, head_conv=16, down_ratio=4):
    return TinyDLASeg(heads, head_conv=head_conv)


def save_model(path, epoch, model, optimizer=None):
    """CenterNet's saver: {'epoch', 'state_dict'[, 'optimizer']}, DataParallel's module. dropped."""
    state_dict = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    data = {"epoch": epoch, "state_dict": state_dict}
    if optimizer is not None:
        data["optimizer"] = optimizer.state_dict()
    torch.save(data, path)
