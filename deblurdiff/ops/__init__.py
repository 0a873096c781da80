from .eac import eac

__all__ = ["eac"]
