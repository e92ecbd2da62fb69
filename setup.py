"""Builds the compiled CPU scan (faiss_rqmoe/_lutscan.c); everything else is in pyproject.toml.

The extension is optional: without a C compiler the install still succeeds and searches on the CPU use the
torch scan (faiss_rqmoe.lutscan.built() says which). It is a plain C library loaded with ctypes, not a
Python module.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "faiss_rqmoe._lutscan", ["faiss_rqmoe/_lutscan.c"],
    # no fused multiply-adds: the C scan must round exactly as the torch scan does
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-math-errno"],
    optional=True)])
