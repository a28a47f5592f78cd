"""bnjax: normalization layers for JAX as pure functions.

Every method is an instance of h = f(g · (x − μ)/√(σ² + ε) + b); they differ only in where μ and
σ² come from. See README.md for the conventions.
"""

from bnjax._src.folding import fold_batch_norm as fold_batch_norm
from bnjax._src.methods import add_layer_norm as add_layer_norm
from bnjax._src.methods import add_rms_norm as add_rms_norm
from bnjax._src.methods import batch_norm as batch_norm
from bnjax._src.methods import batch_renorm as batch_renorm
from bnjax._src.methods import dyt as dyt
from bnjax._src.methods import group_norm as group_norm
from bnjax._src.methods import instance_norm as instance_norm
from bnjax._src.methods import layer_norm as layer_norm
from bnjax._src.methods import mean_only_batch_norm as mean_only_batch_norm
from bnjax._src.methods import rms_norm as rms_norm
from bnjax._src.params import NormParams as NormParams
from bnjax._src.params import init_params as init_params
from bnjax._src.running import AccumulatingStats as AccumulatingStats
from bnjax._src.running import BatchStats as BatchStats
from bnjax._src.running import init_stats as init_stats
from bnjax._src.statistics import moments as moments
from bnjax._src.transform import normalize as normalize
from bnjax._src.weights import cosine_norm as cosine_norm
from bnjax._src.weights import cosine_norm_conv as cosine_norm_conv
from bnjax._src.weights import spectral_norm as spectral_norm
from bnjax._src.weights import spectral_norm_init as spectral_norm_init
from bnjax._src.weights import weight_norm as weight_norm
from bnjax._src.weights import weight_norm_data_init as weight_norm_data_init
from bnjax._src.weights import weight_norm_init as weight_norm_init
from bnjax._src.weights import weight_standardize as weight_standardize

__version__ = "0.1.0"

__all__ = [
    "AccumulatingStats",
    "BatchStats",
    "NormParams",
    "add_layer_norm",
    "add_rms_norm",
    "batch_norm",
    "batch_renorm",
    "cosine_norm",
    "cosine_norm_conv",
    "dyt",
    "fold_batch_norm",
    "group_norm",
    "init_params",
    "init_stats",
    "instance_norm",
    "layer_norm",
    "mean_only_batch_norm",
    "moments",
    "normalize",
    "rms_norm",
    "spectral_norm",
    "spectral_norm_init",
    "weight_norm",
    "weight_norm_data_init",
    "weight_norm_init",
    "weight_standardize",
]
