"""DB's SegDetector head (structure as in MhLiao/DB decoders/seg_detector.py)."""

from collections import OrderedDict

import torch
from torch import nn


def _conv3x3(in_channels, out_channels, bias):
    return nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=bias)


class SegDetector(nn.Module):
    def __init__(
        self,
        in_channels=(64, 128, 256, 512),
        inner_channels=256,
        k=10,
        bias=False,
        adaptive=False,
        smooth=False,
        serial=False,
        *args,
        **kwargs,
    ):
        super().__init__()
        self.k = k
        self.serial = serial
        self.up5 = nn.Upsample(scale_factor=2, mode="nearest")
        self.up4 = nn.Upsample(scale_factor=2, mode="nearest")
        self.up3 = nn.Upsample(scale_factor=2, mode="nearest")
        self.in5 = nn.Conv2d(in_channels[-1], inner_channels, 1, bias=bias)
        self.in4 = nn.Conv2d(in_channels[-2], inner_channels, 1, bias=bias)
        self.in3 = nn.Conv2d(in_channels[-3], inner_channels, 1, bias=bias)
        self.in2 = nn.Conv2d(in_channels[-4], inner_channels, 1, bias=bias)
        quarter = inner_channels // 4
        self.out5 = nn.Sequential(
            _conv3x3(inner_channels, quarter, bias), nn.Upsample(scale_factor=8, mode="nearest")
        )
        self.out4 = nn.Sequential(
            _conv3x3(inner_channels, quarter, bias), nn.Upsample(scale_factor=4, mode="nearest")
        )
        self.out3 = nn.Sequential(
            _conv3x3(inner_channels, quarter, bias), nn.Upsample(scale_factor=2, mode="nearest")
        )
        self.out2 = _conv3x3(inner_channels, quarter, bias)
        # "binarize" is the probability head; DB kept the name for its trained models.
        self.binarize = self._head(inner_channels, quarter, bias)
        self.adaptive = adaptive
        if adaptive:
            self.thresh = self._head(inner_channels + int(serial), quarter, bias)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(module.weight.data)
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1.0)
                module.bias.data.fill_(1e-4)

    @staticmethod
    def _head(in_channels, quarter, bias):
        return nn.Sequential(
            _conv3x3(in_channels, quarter, bias),
            nn.BatchNorm2d(quarter),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(quarter, quarter, 2, 2),
            nn.BatchNorm2d(quarter),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(quarter, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, features, gt=None, masks=None, training=False):
        c2, c3, c4, c5 = features
        in5 = self.in5(c5)
        out4 = self.up5(in5) + self.in4(c4)
        out3 = self.up4(out4) + self.in3(c3)
        out2 = self.up3(out3) + self.in2(c2)
        fuse = torch.cat((self.out5(in5), self.out4(out4), self.out3(out3), self.out2(out2)), 1)
        binary = self.binarize(fuse)
        if not training:
            return binary
        result = OrderedDict(binary=binary)
        if self.adaptive:
            if self.serial:
                fuse = torch.cat((fuse, nn.functional.interpolate(binary, fuse.shape[2:])), 1)
            thresh = self.thresh(fuse)
            result.update(thresh=thresh, thresh_binary=self.step_function(binary, thresh))
        return result

    def step_function(self, x, y):
        return torch.reciprocal(1 + torch.exp(-self.k * (x - y)))
