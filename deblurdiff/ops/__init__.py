from .eac import eac, eac_reference

__all__ = ["eac", "eac_reference"]
