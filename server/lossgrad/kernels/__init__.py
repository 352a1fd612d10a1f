"""numba kernels, one module per loss family, run by the drivers in ``drivers.py``."""
