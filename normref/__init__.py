"""normref: reference normalization math for deep learning, on any Python array API library.

Activations, weights and gradients, after the survey of Huang et al., "Normalization Techniques in
Training DNNs: Methodology, Analysis and Application" (TPAMI 2023), written once against the array
API standard with hand-derived (analytic) backward passes.

    import normref
    y = normref.group_norm(x, 4, weight, bias)            # x: numpy, torch, jax, cupy, array-api-strict
    y, pullback = normref.vjp(normref.group_norm, x, 4, weight, bias)
    dx, dweight, dbias = pullback(dy)

``import normref`` loads numpy and array-api-compat only; frameworks are imported lazily.
"""

from . import framework, operation, partition, recovery, registry
from ._kernels import use_kernels
from .registry import use_adapters
from .framework import RunningResult, batch_normalize, normalize
from .registry import REGISTRY, Example, Invariant, Method, Residuals, get, methods, vjp
from .standardization import (
    LpNormResult,
    MeanOnlyResult,
    NormResult,
    batch_group_norm,
    batch_norm,
    batch_renorm,
    filter_response_norm,
    ghost_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    lp_batch_norm,
    mean_only_batch_norm,
    pixel_norm,
    position_norm,
    rms_norm,
)

from . import combination, gradient, local, weight, whitening
from .population import PopulationStatistics, population_statistics
from .inference import eval_norm, recalibrate
from . import population_normalization
from .population_normalization import (BLENDED_PRESETS, ProngReparameterization, blended_batch_norm,
                                       momentum_bn_momentum, population_norm, prong_reparameterize,
                                       prong_whitening)
from .folding import FOLDABLE, FoldedLayer, NormAffine, fold, inference_affine
from .combination import *  # noqa: F401,F403
from .local import *  # noqa: F401,F403
from .gradient import *  # noqa: F401,F403
from .weight import *  # noqa: F401,F403
from .whitening import *  # noqa: F401,F403
from . import cross_iteration
from .cross_iteration import *  # noqa: F401,F403
from . import online
from . import orthogonal
from .orthogonal import *  # noqa: F401,F403
from . import stiefel
from .stiefel import *  # noqa: F401,F403
from . import decorrelation
from .decorrelation import decov_penalty
from . import propagation
from .propagation import norm_prop, propagate_moments
from .online import (OnlineNormGrad, OnlineNormResult, PowerNormGrad, PowerNormResult, online_norm,
                     online_norm_backward, power_norm, power_norm_backward)

__version__ = "0.1.0"

__all__ = [
    "normalize",
    "batch_normalize",
    "RunningResult",
    "batch_norm",
    "instance_norm",
    "layer_norm",
    "group_norm",
    "rms_norm",
    "mean_only_batch_norm",
    "position_norm",
    "pixel_norm",
    "batch_group_norm",
    "filter_response_norm",
    "lp_batch_norm",
    "batch_renorm",
    "ghost_batch_norm",
    "NormResult",
    "MeanOnlyResult",
    "LpNormResult",
    "vjp",
    "get",
    "methods",
    "REGISTRY",
    "Method",
    "Residuals",
    "Example",
    "Invariant",
    "use_kernels",
    "use_adapters",
    "population_statistics",
    "recalibrate",
    "eval_norm",
    "PopulationStatistics",
    "population_normalization",
    *population_normalization.__all__,
    "fold",
    "inference_affine",
    "NormAffine",
    "FoldedLayer",
    "FOLDABLE",
    "partition",
    "operation",
    "recovery",
    "framework",
    "registry",
    *local.__all__,
    *combination.__all__,
    *whitening.__all__,
    *weight.__all__,
    *decorrelation.__all__,
    *propagation.__all__,
    *gradient.__all__,
    *cross_iteration.__all__,
    *online.__all__,
    *orthogonal.__all__,
    *stiefel.__all__,
]
