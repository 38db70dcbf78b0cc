"""DB's ResNet backbones with modulated DCN in layer2-4 (structure as in MhLiao/DB)."""

import math

import torch.utils.model_zoo as model_zoo
from torch import nn

RESNET_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-5c106cde.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-19c8e357.pth",
}


def _offset_and_mask(offset_mask):
    # DB slices one 27-channel prediction: the offset is a non-contiguous view of it.
    return offset_mask[:, :18, :, :], offset_mask[:, -9:, :, :].sigmoid()


def _deformable_conv2(dcn, planes, stride):
    """conv2_offset (always stride 1) and conv2 (the block's stride), built when the block is
    built: DB imports its compiled DCN here, not at module level."""
    groups = dcn.get("deformable_groups", 1)
    if dcn.get("modulated", False):
        from assets.ops.dcn import ModulatedDeformConv

        conv_op, offset_channels = ModulatedDeformConv, 27
    else:
        from assets.ops.dcn import DeformConv

        conv_op, offset_channels = DeformConv, 18
    conv2_offset = nn.Conv2d(planes, groups * offset_channels, kernel_size=3, padding=1)
    conv2 = conv_op(
        planes,
        planes,
        kernel_size=3,
        padding=1,
        stride=stride,
        deformable_groups=groups,
        bias=False,
    )
    return conv2_offset, conv2


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, dcn=None):
        super().__init__()
        self.with_dcn = dcn is not None
        self.with_modulated_dcn = self.with_dcn and dcn.get("modulated", False)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if self.with_dcn and not dcn.get("fallback_on_stride", False):
            # ResNet-18 strides in conv1: the deformable conv2 has stride 1.
            self.conv2_offset, self.conv2 = _deformable_conv2(dcn, planes, 1)
        else:
            self.with_dcn = False
            self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def _conv2(self, out):
        if not self.with_dcn:
            return self.conv2(out)
        if self.with_modulated_dcn:
            offset, mask = _offset_and_mask(self.conv2_offset(out))
            return self.conv2(out, offset, mask)
        return self.conv2(out, self.conv2_offset(out))

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self._conv2(out))
        out += residual
        return self.relu(out)


class Bottleneck(BasicBlock):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, dcn=None):
        nn.Module.__init__(self)
        self.with_dcn = dcn is not None
        self.with_modulated_dcn = self.with_dcn and dcn.get("modulated", False)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        if self.with_dcn and not dcn.get("fallback_on_stride", False):
            # ResNet-50 strides in the deformable conv2, but its conv2_offset has stride 1.
            self.conv2_offset, self.conv2 = _deformable_conv2(dcn, planes, stride)
        else:
            self.with_dcn = False
            self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dcn = dcn

    def forward(self, x):
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self._conv2(out)))
        out = self.bn3(self.conv3(out))
        out += residual
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, dcn=None, stage_with_dcn=None):
        super().__init__()
        self.dcn = dcn
        self.stage_with_dcn = stage_with_dcn
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        # DB passes dcn to layer2-4 whatever stage_with_dcn says.
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dcn=dcn)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dcn=dcn)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dcn=dcn)
        # Unused by forward, but in every DB checkpoint.
        self.avgpool = nn.AvgPool2d(7, stride=1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.smooth = nn.Conv2d(2048, 256, kernel_size=1, stride=1, padding=1)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                module.weight.data.normal_(0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                module.weight.data.fill_(1)
                module.bias.data.zero_()
        for module in self.modules():
            if hasattr(module, "conv2_offset"):
                nn.init.constant_(module.conv2_offset.weight, 0)
                nn.init.constant_(module.conv2_offset.bias, 0)

    def _make_layer(self, block, planes, blocks, stride=1, dcn=None):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample, dcn=dcn)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, dcn=dcn) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x2 = self.layer1(x)
        x3 = self.layer2(x2)
        x4 = self.layer3(x3)
        x5 = self.layer4(x4)
        return x2, x3, x4, x5


_DCN = {"modulated": True, "deformable_groups": 1, "fallback_on_stride": False}


def _pretrained(model, name, pretrained):
    if pretrained:
        model.load_state_dict(model_zoo.load_url(RESNET_URLS[name]), strict=False)
    return model


def resnet18(pretrained=True, **kwargs):
    return _pretrained(ResNet(BasicBlock, [2, 2, 2, 2], **kwargs), "resnet18", pretrained)


def deformable_resnet18(pretrained=True, **kwargs):
    model = ResNet(
        BasicBlock, [2, 2, 2, 2], dcn=_DCN, stage_with_dcn=[False, True, True, True], **kwargs
    )
    return _pretrained(model, "resnet18", pretrained)


def resnet50(pretrained=True, **kwargs):
    return _pretrained(ResNet(Bottleneck, [3, 4, 6, 3], **kwargs), "resnet50", pretrained)


def deformable_resnet50(pretrained=True, **kwargs):
    model = ResNet(
        Bottleneck, [3, 4, 6, 3], dcn=_DCN, stage_with_dcn=[False, True, True, True], **kwargs
    )
    return _pretrained(model, "resnet50", pretrained)
