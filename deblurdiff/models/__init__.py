from .controlnet import LatentControlNetModel
from .lkpn import LKPNModel

__all__ = ["LKPNModel", "LatentControlNetModel"]
