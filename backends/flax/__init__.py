"""normref for Flax: NNX layers (and a thin linen set) running normref's forward and analytic backward.

    from flax import nnx
    from normref.backends import flax as ntf
    bn = ntf.BatchNorm(64, rngs=nnx.Rngs(0))        # flax.nnx.BatchNorm's constructor, features last
    y = bn(x)                                      # x: (N, H, W, 64); training mode updates bn.mean/var
    it = ntf.IterNorm(64, group_size=16, rngs=nnx.Rngs(0))   # any activation method, from the registry
    g = ntf.Norm("switchable_norm", 64)            # the same, by name

Drop-ins for flax.nnx's layers (same constructor arguments and defaults, same variable names, shapes
and types, so ``nnx.state`` of one can be ``nnx.update``-d into the other):

    BatchNorm    -> normref.batch_norm     LayerNorm    -> normref.layer_norm
    GroupNorm    -> normref.group_norm     RMSNorm      -> normref.rms_norm
    InstanceNorm -> normref.instance_norm

:class:`Norm` (and the named layers ``IterNorm``, ``BatchWhitening``, ``DecorrelatedBatchNorm``,
``WhiteningColoring``, ``BatchRenorm``, ``GhostBatchNorm``, ``SwitchableNorm``, ``LpBatchNorm``,
``MeanOnlyBatchNorm``, ``BatchGroupNorm``, ``BatchInstanceNorm``, ``FilterResponseNorm``) builds an
nnx.Module for any activation method from its registered signature: learnable arrays as
``nnx.Param``, running statistics as ``nnx.BatchStat``.

Flax's conventions: features last (``axis=-1``; the layer passes ``channel_axis=`` to methods that
take it and otherwise moves the axis to normref's position 1 and back), ``momentum`` is the weight
of the *old* running value (0.99; normref's momentum is ``1 − momentum``), ``use_running_average``
in the constructor and the call (``model.eval()`` / ``nnx.view`` set it), ``axis_name`` for batch
statistics across devices (normref's ``sync=`` through :mod:`normref.backends.jax`'s ``axis_name=``).
:class:`BatchNorm` keeps Flax's biased running variance; the generic layers keep the method's own
(normref's, torch's: unbiased).

Gradients are normref's analytic backward (the ``jax.custom_vjp`` functions of
:mod:`normref.backends.jax`); JAX differentiates only the reshapes/transposes around them. Not
supported: ``mask=``, ``axis_index_groups``, non-default ``reduction_axes`` of GroupNorm, non-trailing
``reduction_axes`` of LayerNorm/RMSNorm (``NotImplementedError``/``ValueError``); ``use_fast_variance``
is accepted and ignored (normref's variance is always the stable two-pass one).

:mod:`normref.backends.flax.linen` has linen counterparts of BatchNorm, LayerNorm and GroupNorm and a
generic ``Norm``.
"""

from __future__ import annotations

from . import _nnx
from ._nnx import NAMED, BatchNorm, GroupNorm, InstanceNorm, LayerNorm, Norm, RMSNorm

globals().update({_name: getattr(_nnx, _name) for _name in NAMED})  # IterNorm, BatchWhitening, ...

__all__ = ["BatchNorm", "LayerNorm", "GroupNorm", "RMSNorm", "InstanceNorm", "Norm", "NAMED", *NAMED]
