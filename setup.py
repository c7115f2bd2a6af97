"""Packaging beyond pyproject.toml: the top-level ``configs/`` ships inside the wheel as ``minicpm_jax._configs``
(YAML presets and recipes, and the recipes' data files), found by ``minicpm_jax.config.loading``."""

from setuptools import find_namespace_packages, find_packages, setup

CONFIGS = ["minicpm_jax._configs", *(f"minicpm_jax._configs.{p}" for p in find_namespace_packages(where="configs"))]

setup(
    packages=[*find_packages(include=["minicpm_jax*", "pallas_kernels*"]), *CONFIGS],
    package_dir={"minicpm_jax._configs": "configs"},
    package_data={package: ["*.yaml", "*.jsonl"] for package in CONFIGS},
)
