"""GPU options checked on CPU (channels-last, torch.compile, bf16-mixed) and the fused CBAM path.

The fused CBAM training path (``CBAM._forward_fused``) must give the outputs and gradients of the
straightforward eq. 1 (``CBAM.forward_reference``), which stays the path for eval and
``torch.compile``; under bf16 autocast the fused path runs on bf16 features.
"""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from torch import nn

from attncam.models.attention import CBAM, SpatialGate, _max_over_channels
from attncam.models.lit_module import ClassifierModule
from attncam.models.net import AttentionNet


def _reference_cbam(cbam: CBAM, x: torch.Tensor) -> torch.Tensor:
    """CBAM written out from the paper, independent of the module's code paths."""
    mlp = cbam.channel_gate.mlp
    mc = torch.sigmoid(mlp(x.mean((2, 3))) + mlp(x.amax((2, 3))))[..., None, None]
    f1 = mc * x
    pooled = torch.cat([f1.amax(1, keepdim=True), f1.mean(1, keepdim=True)], 1)
    sg = cbam.spatial_gate
    return torch.sigmoid(sg.bn(sg.conv(pooled))) * f1


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 32, 9, 7), (3, 64, 1, 1), (2, 16, 5, 5), (2, 24, 16, 17)])
def test_fused_cbam_matches_reference(shape: tuple[int, ...], channels_last: bool) -> None:
    torch.manual_seed(0)
    cbam = CBAM(shape[1], reduction=4).double().train()
    nn.init.normal_(cbam.spatial_gate.bn.weight)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn(shape, dtype=torch.float64)
    results = []
    for fn in (cbam, lambda t: _reference_cbam(cbam, t)):
        xx = x.clone().requires_grad_()
        cbam.zero_grad()
        y = fn(xx)
        y.backward(g)
        results.append((y.detach(), xx.grad, [p.grad.clone() for p in cbam.parameters()]))
    (y1, gx1, gp1), (y2, gx2, gp2) = results
    assert torch.allclose(y1, y2, atol=1e-12)
    assert torch.allclose(gx1, gx2, atol=1e-12)
    for a, b in zip(gp1, gp2):
        assert torch.allclose(a, b, atol=1e-10)


@pytest.mark.parametrize("shape", [(2, 256, 16, 16), (3, 40, 16, 17), (2, 7, 20, 20)])
def test_channel_max_tree_matches_max_dim(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    f = torch.randn(shape)
    f[0, :, :2] = 0.0  # exact ties: the index names one of the tied channels
    f[1, 3:5, 4] = 9.0
    tied = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.bool)
    tied[0, :, :2] = tied[1, :, 4] = True
    values, idx = _max_over_channels(f)
    ref_values, ref_idx = f.max(1, keepdim=True)
    assert torch.equal(values, ref_values)
    assert torch.equal(f.gather(1, idx), values)
    assert torch.equal(idx[~tied], ref_idx[~tied])


def test_fused_cbam_taps_and_partial_gradients() -> None:
    torch.manual_seed(0)
    cbam = CBAM(16, reduction=4).train()
    nn.init.normal_(cbam.spatial_gate.bn.weight)
    seen: dict[str, torch.Tensor] = {}
    for key, tap in (("mc", cbam.channel_gate.tap), ("ms", cbam.spatial_gate.tap)):
        tap.register_forward_hook(lambda _m, _i, o, key=key: seen.__setitem__(key, o))
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    y = cbam(x)
    assert seen["mc"].shape == (2, 16, 1, 1) and seen["ms"].shape == (2, 1, 6, 6)
    # A pass that stops at M_s leaves no stale buffer for the full pass that follows.
    (g_ms,) = torch.autograd.grad(y.sum(), seen["ms"], retain_graph=True)
    assert torch.allclose(g_ms, (x * seen["mc"]).sum(1, keepdim=True).detach(), atol=1e-5)
    (gx,) = torch.autograd.grad(y.sum(), x)
    xr = x.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(_reference_cbam(cbam, xr).sum(), xr)
    assert torch.allclose(gx, gr, atol=1e-5)


def _grads(cbam: CBAM, x: torch.Tensor, g: torch.Tensor, fn, autocast: bool) -> tuple:
    cbam.zero_grad()
    xx = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = fn(xx)
    y.backward(g.to(y.dtype))
    grads = [xx.grad.float(), *(p.grad.float().clone() for p in cbam.parameters())]
    return y.detach().float(), type(y.grad_fn).__name__, torch.cat([t.flatten() for t in grads])


def test_fused_cbam_under_bf16_autocast() -> None:
    # bf16-mixed hands CBAM bf16 features: the fused path runs, with the reference's outputs,
    # and gradients as close to the float32 ones as the reference's own bf16 gradients.
    torch.manual_seed(0)
    cbam = CBAM(32, reduction=4).train()
    nn.init.normal_(cbam.spatial_gate.bn.weight)
    x, g = torch.randn(4, 32, 9, 7), torch.randn(4, 32, 9, 7)
    _, _, truth = _grads(cbam, x, g, cbam.forward_reference, autocast=False)
    yf, node, gf = _grads(cbam, x.bfloat16(), g, cbam, autocast=True)
    yr, _, gr = _grads(cbam, x.bfloat16(), g, cbam.forward_reference, autocast=True)
    assert node == "_DoubleGateBackward"
    assert torch.allclose(yf, yr, rtol=1e-4, atol=1e-5)
    err_fused, err_ref = ((t - truth).norm() / truth.norm() for t in (gf, gr))
    assert err_fused <= 1.05 * err_ref + 1e-3
    # float32 features under autocast keep the reference path (mixed dtypes in the maps)
    _, node32, _ = _grads(cbam, x, g, cbam, autocast=True)
    assert node32 != "_DoubleGateBackward"


def test_eval_and_no_grad_use_the_reference_path() -> None:
    cbam = CBAM(8, reduction=2)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        assert torch.equal(cbam(x), cbam.forward_reference(x))
    cbam.eval()
    assert torch.equal(cbam(x), cbam.forward_reference(x))
    assert isinstance(cbam.spatial_gate, SpatialGate)


def test_channels_last_same_logits_and_training_step() -> None:
    torch.manual_seed(0)
    a = ClassifierModule("tiny", 4, attention="cbam", pretrained=False)
    b = ClassifierModule("tiny", 4, attention="cbam", pretrained=False, channels_last=True)
    b.load_state_dict(a.state_dict())
    x = torch.rand(3, 3, 32, 32)
    a.eval(), b.eval()
    assert torch.allclose(a(x), b(b._inputs(x)), atol=1e-5)
    b.train()
    loss = b.training_step((x, torch.tensor([0, 1, 2])), 0)
    loss.backward()
    assert all(p.grad is not None for p in b.parameters() if p.requires_grad)


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++")
def test_compile_gives_same_logits() -> None:
    torch.manual_seed(0)
    net = AttentionNet("tiny", 4, "cbam").eval()
    x = torch.rand(2, 3, 32, 32)
    eager = net(x)
    compiled = torch.compile(net)
    assert torch.allclose(compiled(x), eager, atol=1e-4, rtol=1e-4)
    net.train()
    out = compiled(x)  # training mode: compile takes the reference CBAM path
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None, reason="no C++")
def test_compile_attention_compiles_only_the_attention_with_the_same_values() -> None:
    """model.compile=attention: each CBAM compiled in place (inductor), the backbone eager; the
    training step's logits and every gradient equal the eager network's, and the parameter
    names (checkpoint keys) do not change."""
    import copy

    from attncam.stages.train import compile_model

    torch.manual_seed(0)
    eager = AttentionNet("tiny", 4, "cbam").train()
    for name in eager.attention_names:  # non-trivial spatial gates
        nn.init.normal_(eager.get_submodule(name).spatial_gate.bn.weight)
    net = copy.deepcopy(eager)
    keys = list(net.state_dict())
    compile_model(net, "attention")
    assert list(net.state_dict()) == keys
    compiled = {n for n, m in net.named_modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled == set(net.attention_names) and compiled
    x = torch.rand(3, 3, 32, 32)
    out, ref = net(x), eager(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-4)
    (out * torch.arange(4.0)).sum().backward()
    (ref * torch.arange(4.0)).sum().backward()
    for (name, p), q in zip(net.named_parameters(), eager.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-3), name


def test_compile_model_names_the_valid_values() -> None:
    from attncam.stages.train import compile_model

    net = AttentionNet("tiny", 4, "cbam")
    compile_model(net, False)
    compile_model(net, "false")  # a string from the command line
    assert not any(getattr(m, "_compiled_call_impl", None) for m in net.modules())
    with pytest.raises(ValueError, match=r"model.compile='attn' is not valid; choose false .*"
                       r"true .* or attention"):  # fmt: skip
        compile_model(net, "attn")


def test_bf16_mixed_precision_runs_a_step(tmp_path) -> None:
    torch.manual_seed(0)
    module = ClassifierModule("tiny", 4, attention="cbam", pretrained=False, log_images=0)
    data = torch.utils.data.TensorDataset(torch.rand(8, 3, 32, 32), torch.randint(0, 4, (8,)))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    trainer = L.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        fast_dev_run=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    changed = [not torch.equal(a, p) for a, p in zip(before, module.parameters())]
    assert any(changed)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
