"""Pallas kernels (TPU Mosaic, opt-in GPU Triton), one op per file: kernel, public wrapper, pure-jnp reference.

The FP8 block-scaled kernels of issue [3/5] live here; the model's default path is XLA.
"""
