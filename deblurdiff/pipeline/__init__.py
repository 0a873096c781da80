"""The DeblurDiff pipeline, its tiled processing, its time and memory estimates, and its loading."""
