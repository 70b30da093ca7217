"""paperlib: the science behind the companion to two papers on sparse-autoencoder features.

Song et al. 2025 (feature consistency across seeds, PW-MCC) and Leask et al. 2025 (SAE stitching,
meta-SAEs). One subpackage per part of the design, one module per idea:

- ``sae``: the SAE bank, its architectures, the training loop and its CPU kernels;
- ``sources``: what SAEs read — synthetic organisms with a known dictionary, LLM activations, cached or streamed;
- ``metrics``: consistency (MCC, PW-MCC, chance levels), exact matching, per-latent stability, subspaces;
- ``runs``: trained SAEs through the cache — single runs, the zoo at a target L0, seeds, width families, sweeps as
  jobs;
- ``stitching``: paper B's stitching, interpolation paths and meta-SAEs;
- ``explain``: top-activating contexts, explanations and their similarity;

beside them the cache (``store``), weights in and out of peer libraries (``interop``), the explorer pages,
plotting, the papers' quoted values and the CLI. The names below are the ones most uses need.
"""

from paperlib.interop import load_bank, load_sae, save_sae
from paperlib.metrics.consistency import bootstrap_interval, chance_mcc, chance_pw_mcc, match, pw_mcc
from paperlib.metrics.stability import latent_stability
from paperlib.runtime import device
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train, train_many
from paperlib.sae.view import SAEView
from paperlib.sources.activations import ActivationConfig, load_activations
from paperlib.sources.stream import ModelStream, TensorStream

__version__ = "0.1.0"

__all__ = [
    "ActivationConfig",
    "ModelStream",
    "SAEBank",
    "SAEConfig",
    "SAEView",
    "TensorStream",
    "TrainConfig",
    "bootstrap_interval",
    "chance_mcc",
    "chance_pw_mcc",
    "device",
    "latent_stability",
    "load_activations",
    "load_bank",
    "load_sae",
    "match",
    "pw_mcc",
    "save_sae",
    "train",
    "train_many",
    "__version__",
]
