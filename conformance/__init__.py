"""The conformance suite: every registered method × every array library × every dtype, checked
against a float64 NumPy evaluation, against each other, against finite differences, against the
registry's invariants and (PyTorch, JAX) against autograd, to first and second order.

    normref conformance --quick                 # the command (``python -m normref.conformance``)

    import normref.conformance as nc
    report = nc.run(methods=["group_norm"], backends=["numpy", "torch"])
    print(report); report.raise_for_failures()

    import torch.nn.functional as F
    nc.check(F.group_norm, like="group_norm")   # someone else's implementation against normref

Tolerances: :mod:`normref.conformance.tolerance`. Results: :class:`Report` of :class:`Record`.
"""

from .report import ConformanceError, Record, Report
from .suite import case_inputs, replay, run
from .third_party import check

__all__ = ["run", "check", "replay", "case_inputs", "Report", "Record", "ConformanceError"]
