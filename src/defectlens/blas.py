"""numpy's BLAS kept to one thread in processes that score images (`predict`, `evaluate`,
`serve`, Dask workers).

Why: defectlens already spreads its own heavy numpy work over threads (PaDiM's per-position
products, `components.distances`), and its remaining numpy products are small (the map
resampling). OpenBLAS nonetheless threads those, and its helper threads then spin for about
0.1 s after each call, holding a core while the next image's engine run and Mahalanobis step
want it. For single images, the service's usual case, that cost 29 % of the time per image (35
against 25 ms, measured; batches of 32 were unchanged). Only numpy's own OpenBLAS is limited:
faiss has its own, which its searches need threaded.
"""

from __future__ import annotations

from pathlib import Path


def numpy_blas_single_threaded() -> bool:
    """Limit the BLAS library shipped inside numpy's wheel to one thread, for the rest of the
    process; True when one was found and limited. Does nothing (False) without threadpoolctl
    or with a numpy built on a system BLAS, whose other users we cannot tell apart."""
    try:
        import numpy as np
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return False
    package = Path(np.__file__).resolve().parent
    # numpy's wheels bundle their BLAS next to the package: numpy.libs/ (Linux, Windows) or
    # numpy/.dylibs/ (macOS).
    folders = {package.parent / "numpy.libs", package / ".dylibs"}
    found = False
    for library in ThreadpoolController().lib_controllers:
        if library.user_api == "blas" and Path(library.filepath).resolve().parent in folders:
            library.set_num_threads(1)
            found = True
    return found
