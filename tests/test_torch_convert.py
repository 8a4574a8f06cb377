"""convert(model) / unconvert (issue 16): torch's norm layers swapped for normref's drop-ins and back;
torch's own tooling (swa_utils.update_bn, convert_sync_batchnorm, fuse_conv_bn_eval, torch.fx) on
normref's layers.

Tolerances (how each is derived)
- torch's layer vs normref's drop-in, float64: the same function computed by two implementations
  (different summation orders of the same reductions over ≤ 200 values per statistic, then a few
  elementwise operations and a chain of ≤ 10 layers): each output differs by a few ulp of the
  values it is made of, ~n·ε₆₄·max|y| with n ≤ 200, inside TOL64 = 1e3·ε₆₄ relative (rel_err scales
  by max(1, max|b|)). Gradients: the same budget (the backward is the same kind of reductions).
- fuse_conv_bn_eval: torch folds in the layer dtype (float64 here): W' = W·γ/√(σ̂² + ε), a 27-term
  convolution sum re-associated: ~30·ε₆₄ relative, inside TOL64.
"""

from __future__ import annotations

import pytest

from tests.conftest import TOL64, rel_err

torch = pytest.importorskip("torch")
nn = torch.nn

from normref.backends import torch as nt  # noqa: E402


class Block(nn.Module):
    """A residual block (custom forward): conv-BN-ReLU-conv-BN plus the identity."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c, momentum=None)  # the cumulative average
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(x + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))))


def _model():
    """A small torchvision-like model (no downloads) with every torch norm layer convert swaps."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        Block(8),
        nn.GroupNorm(2, 8), nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        nn.LocalResponseNorm(3),
        nn.Conv2d(8, 4, 1), nn.InstanceNorm2d(4),  # torch's default: no affine, no running statistics
        nn.Flatten(), nn.LayerNorm(4 * 25), nn.Linear(100, 12), nn.BatchNorm1d(12), nn.RMSNorm(12),
        nn.Linear(12, 6), nn.Unflatten(1, (2, 3)), nn.BatchNorm1d(2), nn.Flatten(), nn.RMSNorm(6, eps=1e-6),
    ).double()


_TORCH_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm, nn.LayerNorm,
                nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _norm_types(model):
    return [type(m) for m in model.modules() if isinstance(m, _TORCH_NORMS)]


def _step(model, x):
    """One training forward/backward: the output, the input gradient, every parameter gradient."""
    x = x.clone().requires_grad_(True)
    for p in model.parameters():
        p.grad = None
    y = model(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def test_convert_and_back_same_function_state_and_objects():
    ref = _model()
    model = _model()
    params_before = [id(p) for p in model.parameters()]
    buffers_before = [id(b) for b in model.buffers()]
    keys_before = list(model.state_dict())
    n_norms = len(_norm_types(model))
    assert n_norms == 12
    model[5].eval()  # a layer's own training flag (not the model's) must survive
    ref[5].eval()
    out = nt.convert(model)
    assert out is model and out.normref_converted == n_norms
    # every torch norm layer is now normref's drop-in of the same torch class
    for m in out.modules():
        if isinstance(m, _TORCH_NORMS):
            assert type(m).__module__ == "normref.backends.torch.modules", type(m)
            assert isinstance(m, nt.NormrefModule)
    assert [id(p) for p in out.parameters()] == params_before  # the same Parameter objects
    assert [id(b) for b in out.buffers()] == buffers_before
    assert list(out.state_dict()) == keys_before
    assert out[5].training is False and out[1].training is True
    assert all(p.dtype == torch.float64 for p in out.parameters())
    torch.manual_seed(1)
    for step in range(3):  # running statistics accumulate over three training steps, the same way
        x = torch.randn(5, 3, 5, 5, dtype=torch.float64)
        y0, gx0, gp0 = _step(ref, x)
        y1, gx1, gp1 = _step(out, x)
        assert rel_err(y1, y0) < TOL64, step
        assert rel_err(gx1, gx0) < TOL64, step
        for a, b in zip(gp1, gp0):
            assert rel_err(a, b) < TOL64, step
    for (k, a), (_, b) in zip(out.state_dict().items(), ref.state_dict().items()):
        assert rel_err(a, b) < TOL64, k
    out.eval()
    ref.eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert rel_err(out(x).detach(), ref(x).detach()) < TOL64
    # and back: torch's own classes again, still the same objects
    back = nt.unconvert(out)
    assert back is out and back.normref_converted == n_norms
    assert _norm_types(back) == _norm_types(_model())
    assert [id(p) for p in back.parameters()] == params_before
    assert rel_err(back(x).detach(), ref(x).detach()) < TOL64


def test_convert_keeps_hooks_and_handles():
    model = _model()
    seen = []
    handle = model[1].register_forward_hook(lambda mod, args, out: seen.append(type(mod).__module__))
    pre = model[4].register_forward_pre_hook(lambda mod, args: seen.append("pre"))
    nt.convert(model)
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert seen == ["normref.backends.torch.modules", "pre"]  # the hooks run on normref's layers
    handle.remove()  # a handle taken before the conversion removes the converted layer's hook
    pre.remove()
    model(torch.randn(2, 3, 5, 5, dtype=torch.float64))
    assert len(seen) == 2


def test_convert_root_layer_shared_layer_and_subclasses():
    bn = nn.BatchNorm1d(3)
    root = nt.convert(bn)  # the model itself is a layer: its replacement is returned
    assert type(root) is nt.BatchNorm1d and root.weight is bn.weight
    shared = nn.LayerNorm(4)

    class MyNorm(nn.LayerNorm):  # a subclass has a forward of its own: left alone
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(shared, nn.ReLU(), shared, MyNorm(4), nt.IterNorm(4, group_size=2))
    nt.convert(model)
    assert type(model[0]) is nt.LayerNorm and model[0] is model[2]  # one new layer at both places
    assert type(model[3]) is MyNorm and type(model[4]) is nt.IterNorm
    assert model.normref_converted == 1
    nt.unconvert(model)
    assert type(model[0]) is nn.LayerNorm and model[0] is model[2] and type(model[4]) is nt.IterNorm


def test_convert_sync_batchnorm_and_process_groups():
    sbn = nn.SyncBatchNorm(4)
    model = nt.convert(nn.Sequential(sbn))
    assert type(model[0]) is nt.SyncBatchNorm and model[0].running_mean is sbn.running_mean
    x = torch.randn(6, 4, 3)
    # no process group initialized: one process, so the batch statistics are local (torch's rule)
    want = nn.functional.batch_norm(x, None, None, sbn.weight, sbn.bias, True).detach()
    assert rel_err(model(x).detach(), want) < 1e3 * torch.finfo(torch.float32).eps  # float32: ε₃₂ budget
    assert type(nt.unconvert(model)[0]) is nn.SyncBatchNorm
    synced = nn.Sequential(nt.BatchNorm2d(4, process_group=nt.WORLD))
    with pytest.raises(TypeError, match=r"convert\(back=True\): BatchNorm2d has synchronized statistics"):
        nt.unconvert(synced)


def test_convert_bad_arguments():
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module; got list"):
        nt.convert([nn.BatchNorm1d(2)])
    with pytest.raises(TypeError, match="convert: back must be a bool; got int"):
        nt.convert(nn.BatchNorm1d(2), back=1)


# --------------------------------------------------------------------------------------------------
# torch's tooling on normref's layers
# --------------------------------------------------------------------------------------------------
def test_swa_update_bn_sees_normref_batch_norms():
    """update_bn resets every _BatchNorm and re-estimates its statistics (cumulative average) on the
    loader: normref's BatchNorm*d get exactly torch's BatchNorm*d's statistics."""
    ref = _model()
    model = nt.convert(_model())
    torch.manual_seed(3)
    loader = [torch.randn(4, 3, 5, 5, dtype=torch.float64) for _ in range(3)]
    model[1].running_mean.fill_(7.0)  # stale statistics, replaced by update_bn
    torch.optim.swa_utils.update_bn(loader, ref)
    torch.optim.swa_utils.update_bn(loader, model)
    for (k, a), (_, b) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert rel_err(a, b) < TOL64, k
    assert int(model[1].num_batches_tracked) == 3 and model[1].momentum == 0.1  # momentum restored


def test_torch_convert_sync_batchnorm_sees_normref_batch_norms():
    model = nn.Sequential(nt.BatchNorm2d(4), nt.IterNorm2d(4, group_size=2), nt.LayerNorm(3))
    out = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert type(out[0]) is nn.SyncBatchNorm  # torch's converter recognises normref's batch norm ...
    assert out[0].weight is model[0].weight
    assert type(out[1]) is nt.IterNorm2d  # ... and leaves whitening (not a batch norm) alone
    assert type(out[2]) is nt.LayerNorm


def test_fuse_conv_bn_eval_on_normref_batch_norm():
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3, padding=1).double().eval()
    bn = nt.BatchNorm2d(4, dtype=torch.float64)
    bn(conv(torch.randn(8, 3, 5, 5, dtype=torch.float64)))  # some running statistics
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    fused = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert rel_err(fused(x).detach(), bn(conv(x)).detach()) < TOL64


def test_fx_tracer_keeps_normref_layers_as_leaves():
    model = nt.convert(_model())
    with pytest.raises(Exception):  # torch's tracer traces into normref's layers and fails
        torch.fx.symbolic_trace(model)
    gm = nt.symbolic_trace(model)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "1" in targets and "3.bn1" in targets and "10" in targets  # one node per normref layer
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert type(gm.get_submodule("3.bn1")) is nt.BatchNorm2d  # normref's layer, called by the graph
    assert rel_err(gm(x).detach(), model(x).detach()) < TOL64
