"""Metadata lives in pyproject.toml; this file only exists for the C++ extension of csrc/
(added by the CPU-backend work). Set VARKERNELS_SKIP_CPP_BUILD=1 to skip building it."""

from setuptools import setup

setup()
