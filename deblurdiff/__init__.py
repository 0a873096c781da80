"""DeblurDiff: real-world image deblurring with generative diffusion models."""

__version__ = "0.1.0"
