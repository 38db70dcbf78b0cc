from .seg_detector import SegDetector

__all__ = ["SegDetector"]
