"""numba CPU kernels for NumPy inputs (to be filled by the kernels issue)."""


def register() -> None:
    """Register the numba kernels with normref's kernel registry (none yet)."""
