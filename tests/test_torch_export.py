"""TorchScript, ONNX and tracing of models with normref layers (issue 16): what scripts and exports,
and the clear errors where it does not.

Tolerances (how each is derived)
- torch's layers (after exportable) vs normref's drop-ins, float64: two implementations of the same
  function, reductions over ≤ 75 values re-associated: ~n·ε₆₄ relative, inside TOL64 = 1e3·ε₆₄.
- InferenceAffine vs normref's eval-mode whitening, float64: the same matrix function W(Σ̂ + εI)
  evaluated by the same code, then A·x (d = 4 terms) against normref's centring, W·x̂ and affine
  (another order): ~d·ε₆₄·κ(Σ̂ + εI); allowed TOL64·κ (κ measured on the running covariances).
- onnxruntime vs eager, float32: ORT's kernels sum the same ≤ 75 values in another order (and the
  exporter may fold a layer into its neighbour), ~n·ε₃₂ relative: 1e3·ε₃₂ allowed; for whitening
  the affine map was formed in float64 and cast (ε₃₂ each entry) against normref's float32 eval-mode
  whitening (~ε₃₂·κ): 1e3·ε₃₂·κ allowed.
"""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import TOL64, rel_err

torch = pytest.importorskip("torch")
nn = torch.nn

from normref.backends import torch as nt  # noqa: E402

EPS32 = float(torch.finfo(torch.float32).eps)


def _drop_ins(dtype=torch.float64):
    """Every normref drop-in of a torch layer, batch norm first (so no exporter folds it into a conv)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nt.BatchNorm2d(3), nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nt.GroupNorm(2, 6),
        nt.InstanceNorm2d(6, affine=True), nt.LocalResponseNorm(3), nn.Flatten(), nt.LayerNorm(150),
        nt.RMSNorm(150, eps=1e-6),
    ).to(dtype)


def _whitening(dtype=torch.float64):
    """Whitening and batch-norm-like StatefulNorm layers, trained a few steps so the running statistics
    are not the initial ones."""
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nt.DecorrelatedBatchNorm2d(8, group_size=4), nt.IterNorm2d(8, group_size=4),
        nt.BatchRenorm2d(8), nt.BatchNorm2d(8),
    ).to(dtype)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 4, 4, dtype=dtype) * torch.tensor([1.0, 2.0, 0.5], dtype=dtype).reshape(3, 1, 1))
    return model.eval()


def _kappa(model):
    """The largest condition number of the running covariances (+ εI) of the whitening layers."""
    ks = [np.linalg.cond(m.running_cov.detach().double().numpy() + m.eps * np.eye(m.running_cov.shape[-1])).max()
          for m in model.modules() if hasattr(m, "running_cov")]
    return float(max(ks))


def test_jit_script_refuses_normref_layers_with_the_reason():
    model = _drop_ins()
    for layer in (model, nt.BatchNorm2d(3), nt.IterNorm(4, group_size=2), nt.Norm("pixel_norm")):
        with pytest.raises(TypeError, match=r"cannot be scripted: its forward calls normref's torch\.autograd\."
                                            r"Function .*exportable\(model\)"):
            torch.jit.script(layer)
    # the failed attempt left the eager model as it was (torch.jit.script rewrites submodules in place)
    assert type(model[0]) is nt.BatchNorm2d and type(model[8]) is nt.RMSNorm


def test_exportable_scripts_and_equals_eager():
    model = _drop_ins()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    model(x)  # training mode: running statistics
    exp = nt.exportable(model)
    assert type(model[0]) is nt.BatchNorm2d  # a copy was converted, not the model
    assert not any(isinstance(m, nt.NormrefModule) for m in exp.modules())
    scripted = torch.jit.script(exp)
    for mode in ("train", "eval"):  # the drop-ins script in both modes (torch's own layers)
        model.train(mode == "train")
        scripted.train(mode == "train")
        xg = x.clone().requires_grad_(True)
        xs = x.clone().requires_grad_(True)
        y, ys = model(xg), scripted(xs)
        assert rel_err(ys.detach(), y.detach()) < TOL64, mode
        y.pow(2).sum().backward()
        ys.pow(2).sum().backward()  # torch's autograd in the scripted model, normref's backward eagerly
        assert rel_err(xs.grad, xg.grad) < TOL64, mode
    assert rel_err(model[0].running_mean, getattr(scripted, "0").running_mean) < TOL64


def test_exportable_whitening_is_its_affine_map_and_scripts():
    model = _whitening()
    exp = nt.exportable(model)
    kinds = [type(m).__name__ for m in exp]
    assert kinds == ["Conv2d", "InferenceAffine", "InferenceAffine", "InferenceAffine", "BatchNorm2d"]
    assert exp[1].group_size == 4 and exp[3].group_size == 1
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    want = model(x).detach()
    assert rel_err(exp(x).detach(), want) < TOL64 * _kappa(model)
    assert rel_err(torch.jit.script(exp)(x).detach(), want) < TOL64 * _kappa(model)


def test_exportable_refuses_what_has_no_equivalent():
    with pytest.raises(TypeError, match=r"exportable: 1 \(IterNorm2d\) has no scriptable equivalent: it is in "
                                        r"training mode"):
        nt.exportable(nn.Sequential(nn.Identity(), nt.IterNorm2d(4, group_size=2)))
    no_stats = nn.Sequential(nt.BatchRenorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(TypeError, match=r"0 \(BatchRenorm2d\) has no scriptable equivalent: its inference call"):
        nt.exportable(no_stats)
    with pytest.raises(TypeError, match=r"model \(Norm\) has no scriptable equivalent"):
        nt.exportable(nt.Norm("pixel_norm").eval())
    synced = nn.Sequential(nt.BatchNorm2d(4, process_group=nt.WORLD))
    with pytest.raises(TypeError, match="synchronizes its statistics in training mode"):
        nt.exportable(synced)
    assert type(nt.exportable(synced.eval())[0]) is nn.BatchNorm2d  # eval: running statistics, no sync
    with pytest.raises(TypeError, match="exportable: model must be a torch.nn.Module; got str"):
        nt.exportable("model")
    with pytest.raises(ValueError, match=r"InferenceAffine: matrix must be \(G, d, d\)"):
        nt.InferenceAffine(torch.ones(2, 2, 3), torch.ones(4))


def test_jit_trace_emits_native_ops_and_refuses_stateful_layers():
    model = _drop_ins().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    traced = torch.jit.trace(model, (x,))
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert {"aten::batch_norm", "aten::group_norm", "aten::instance_norm", "aten::layer_norm",
            "aten::rms_norm"} <= kinds  # torch's native operators, not normref's formula
    assert rel_err(traced(x).detach(), model(x).detach()) < TOL64
    with pytest.raises(TypeError, match=r"IterNorm2d: export the model through normref\.backends\.torch\.exportable"):
        torch.jit.trace(nt.IterNorm2d(4, group_size=2).eval(), (torch.randn(2, 4, 3, 3),))


class _Branch(nn.Module):
    def forward(self, x):
        return x + 1 if nt.exporting() else x - 1


def test_exporting_flag():
    x = torch.zeros(2)
    assert nt.exporting() is False and _Branch()(x).tolist() == [-1, -1]  # eager
    # torch.compile is not an export: the compiled model keeps normref's Function
    assert torch.compile(_Branch(), fullgraph=True, backend="eager")(x).tolist() == [-1, -1]
    assert torch.jit.trace(_Branch(), (x,))(x).tolist() == [1, 1]
    assert torch.export.export(_Branch(), (x,)).module()(x).tolist() == [1, 1]


# --------------------------------------------------------------------------------------------------
# ONNX (slow: each export runs torch.export and the ONNX translation, seconds)
# --------------------------------------------------------------------------------------------------
def _ort(proto_bytes, x):
    ort = pytest.importorskip("onnxruntime")
    sess = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def test_onnx_dynamo_export_of_drop_ins_is_native():
    onnx = pytest.importorskip("onnx")
    model = _drop_ins(torch.float32)
    x = torch.randn(4, 3, 5, 5)
    model(x)
    model.eval()
    prog = torch.onnx.export(model, (x,), dynamo=True, opset_version=21)
    onnx.checker.check_model(prog.model_proto, full_check=True)
    ops = {n.op_type for n in prog.model_proto.graph.node}
    assert {"BatchNormalization", "GroupNormalization", "InstanceNormalization", "LayerNormalization"} <= ops
    got = _ort(prog.model_proto.SerializeToString(), x)
    assert rel_err(got, model(x).detach()) < 1e3 * EPS32


def test_onnx_export_of_whitening_in_eval_mode():
    onnx = pytest.importorskip("onnx")
    model = _whitening(torch.float32)
    x = torch.randn(5, 3, 4, 4)
    prog = torch.onnx.export(nt.exportable(model), (x,), dynamo=True)
    onnx.checker.check_model(prog.model_proto, full_check=True)
    ops = [n.op_type for n in prog.model_proto.graph.node]
    assert ops.count("MatMul") == 2  # DBN and IterNorm: y_g = A_g·x_g, no eigh / Newton steps in the graph
    got = _ort(prog.model_proto.SerializeToString(), x)
    assert rel_err(got, model(x).detach()) < 1e3 * EPS32 * _kappa(model)


def test_onnx_torchscript_exporter_takes_the_drop_ins():
    import io

    onnx = pytest.importorskip("onnx")
    model = _drop_ins(torch.float32)[:-1].eval()  # torch's TorchScript exporter has no aten::rms_norm
    x = torch.randn(2, 3, 5, 5)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False)
    proto = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(proto, full_check=True)
    assert {"BatchNormalization", "LayerNormalization"} <= {n.op_type for n in proto.graph.node}
    assert rel_err(_ort(buf.getvalue(), x), model(x).detach()) < 1e3 * EPS32


def test_readme_section_runs():
    """The README's convert / exportable block runs as written."""
    import pathlib

    text = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = text.split("## Existing torch models, torch's tooling, TorchScript and ONNX", 1)[1].split("\n## ", 1)[0]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(code, "README.md", "exec"), {})
