"""Attention kernels for MiniCPM4 / MiniCPM-SALA: each op has a reference, an XLA version and Pallas kernels.

This package never imports ``minicpm_jax``.
"""
