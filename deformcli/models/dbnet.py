"""An example DBNet text detector: ResNet-18 with DCNv2 in stages 2-4, FPN, DB head.

Laid out like the Differentiable Binarization code (MhLiao/DB): each BasicBlock of stages 2-4
predicts offset and mask with ``conv2_offset`` (27 channels) beside its deformable ``conv2``;
the decoder fuses the four stages at 1/4 resolution and the head predicts the probability map.
Used by ``deformcli demo`` and ``deformcli bench --preset dbnet``; ``deform_layer`` picks whose
deformable layer the model is built with (torchvision's, as a GPU training script would, ours,
or a dense ``nn.Conv2d`` for the speed floor).
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deformcli.ops.deform_conv import DeformConv2d

__all__ = ["DBNet", "build_dbnet"]


def _deform_layer_class(deform_layer: str) -> type[nn.Module]:
    if deform_layer == "deformcli":
        return DeformConv2d
    if deform_layer == "torchvision":
        import torchvision.ops

        return torchvision.ops.DeformConv2d
    if deform_layer == "dense":
        return nn.Conv2d
    raise ValueError(
        f"deform_layer must be 'deformcli', 'torchvision' or 'dense', got {deform_layer!r}"
    )


class BasicBlock(nn.Module):
    """ResNet basic block; with ``deformable`` its second conv is modulated DCN (DCNv2)."""

    def __init__(
        self, inplanes: int, planes: int, stride: int, deformable: bool, deform_layer: str
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.deformable = deformable and deform_layer != "dense"
        if self.deformable:
            self.conv2_offset = nn.Conv2d(planes, 27, kernel_size=3, padding=1)
        layer = _deform_layer_class(deform_layer) if deformable else nn.Conv2d
        self.conv2 = layer(planes, planes, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.deformable:
            offset_mask = self.conv2_offset(out)
            out = self.conv2(out, offset_mask[:, :18], offset_mask[:, -9:].sigmoid())
        else:
            out = self.conv2(out)
        out = self.bn2(out)
        residual = x if self.downsample is None else self.downsample(x)
        return F.relu(out + residual)


class ResNet18(nn.Module):
    """ResNet-18 trunk returning the four stage outputs (strides 4, 8, 16, 32)."""

    def __init__(self, deform_layer: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        inplanes = 64
        for index, planes in enumerate((64, 128, 256, 512)):
            stride = 1 if index == 0 else 2
            deformable = index > 0  # DCN in stages 2-4, as DB's deformable_resnet18
            stages.append(
                nn.Sequential(
                    BasicBlock(inplanes, planes, stride, deformable, deform_layer),
                    BasicBlock(planes, planes, 1, deformable, deform_layer),
                )
            )
            inplanes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, stride=2, padding=1)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return c2, c3, c4, c5


class SegDetector(nn.Module):
    """FPN over the four stages and DB's probability head, at the input resolution."""

    def __init__(self, in_channels=(64, 128, 256, 512), inner_channels: int = 256) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, inner_channels, 1, bias=False) for c in in_channels
        )
        self.smooth = nn.ModuleList(
            nn.Conv2d(inner_channels, inner_channels // 4, 3, padding=1, bias=False)
            for _ in in_channels
        )
        self.binarize = nn.Sequential(
            nn.Conv2d(inner_channels, inner_channels // 4, 3, padding=1, bias=False),
            nn.BatchNorm2d(inner_channels // 4),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner_channels // 4, inner_channels // 4, 2, 2),
            nn.BatchNorm2d(inner_channels // 4),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(inner_channels // 4, 1, 2, 2),
            nn.Sigmoid(),
        )

    def forward(self, features: tuple[Tensor, ...]) -> Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral, features, strict=True)]
        for level in range(len(laterals) - 1, 0, -1):  # top-down pathway
            laterals[level - 1] = laterals[level - 1] + F.interpolate(
                laterals[level], size=laterals[level - 1].shape[2:], mode="nearest"
            )
        size = laterals[0].shape[2:]
        fused = torch.cat(
            [
                F.interpolate(conv(p), size=size, mode="nearest")
                for conv, p in zip(self.smooth, laterals, strict=True)
            ],
            dim=1,
        )
        return self.binarize(fused)


class DBNet(nn.Module):
    """Input ``(N, 3, H, W)`` with H, W multiples of 32; output ``(N, 1, H, W)`` probabilities."""

    def __init__(self, deform_layer: str = "torchvision") -> None:
        super().__init__()
        self.backbone = ResNet18(deform_layer)
        self.decoder = SegDetector()

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.backbone(x))


def build_dbnet(deform_layer: str = "torchvision", seed: int | None = 0) -> DBNet:
    """The example DBNet, with non-trivial offsets (as after training) when ``seed`` is set.

    ``deform_layer``: ``"torchvision"`` (as the GPU training code builds it), ``"deformcli"``
    or ``"dense"`` (plain convolution in place of the deformable ones: the speed floor).
    """
    if seed is not None:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    model = DBNet(deform_layer)
    if seed is not None:
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.BatchNorm2d):
                    module.running_mean.normal_(0, 0.1)
                    module.running_var.uniform_(0.5, 1.5)
            for name, parameter in model.named_parameters():
                if "conv2_offset" in name:
                    parameter.normal_(0, 0.05 if name.endswith("weight") else 1.0)
        torch.random.set_rng_state(generator_state)
    return model.eval()
