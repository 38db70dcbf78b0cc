from .resnet import deformable_resnet18, deformable_resnet50, resnet18, resnet50

__all__ = ["deformable_resnet18", "deformable_resnet50", "resnet18", "resnet50"]
