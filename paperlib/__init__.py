"""paperlib: the science behind the companion to two papers on sparse-autoencoder features.

Song et al. 2025 (feature consistency across seeds, PW-MCC) and Leask et al. 2025 (SAE stitching,
meta-SAEs). One module per idea; the notebooks in ``notebooks/`` turn them into the figures.
"""

from paperlib.runtime import device

__version__ = "0.1.0"

__all__ = ["device", "__version__"]
