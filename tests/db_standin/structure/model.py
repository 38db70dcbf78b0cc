"""DB's BasicModel and its trainer wrapper (structure as in MhLiao/DB structure/model.py)."""

import backbones
import decoders
from torch import nn


class BasicModel(nn.Module):
    def __init__(self, args):
        nn.Module.__init__(self)
        self.backbone = getattr(backbones, args["backbone"])(**args.get("backbone_args", {}))
        self.decoder = getattr(decoders, args["decoder"])(**args.get("decoder_args", {}))

    def forward(self, data, *args, **kwargs):
        return self.decoder(self.backbone(data), *args, **kwargs)


class SegDetectorModel(nn.Module):
    """The trainer's model: DB saves this one's state_dict, so keys read model.module.*."""

    def __init__(self, args, device):
        super().__init__()
        self.model = nn.DataParallel(BasicModel(args))
        self.device = device
        self.to(self.device)

    def forward(self, batch, training=True):
        data = batch["image"] if isinstance(batch, dict) else batch
        return self.model(data.to(self.device).float(), training=training)
