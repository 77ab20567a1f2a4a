"""picochat.model.layers.Linear: the oneDNN fp32 path gives nn.Linear's values and gradients."""
import pytest
import torch
import torch.nn.functional as F

from picochat.model import layers
from picochat.model.layers import Linear


@pytest.mark.parametrize("shape,bias", [((4, 16, 24), True), ((40, 24), False), ((1, 1, 24), True)])
@pytest.mark.parametrize("out", [8, 56])
def test_linear_matches_f_linear_values_and_grads(shape, bias, out):
    torch.manual_seed(0)
    lin = Linear(24, out, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    y = lin(x)
    g = torch.randn_like(y)
    y.backward(g)
    got = [y.detach(), x.grad, lin.weight.grad] + ([lin.bias.grad] if bias else [])
    x2 = x.detach().double().requires_grad_()
    w2 = lin.weight.detach().double().requires_grad_()
    b2 = lin.bias.detach().double().requires_grad_() if bias else None
    y2 = F.linear(x2, w2, b2)
    y2.backward(g.double())
    want = [y2.detach(), x2.grad, w2.grad] + ([b2.grad] if bias else [])
    for a, b in zip(got, want):
        assert a.dtype == torch.float32 and a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), y.detach())


def test_linear_under_autocast_and_without_onednn_is_plain(monkeypatch):
    lin = Linear(8, 4)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x).dtype == torch.bfloat16
    monkeypatch.setattr(layers, "_onednn_linear_op", lambda: None)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias))


def test_onednn_is_used_on_x86_cpus():
    import platform
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("oneDNN fp32 linear is only expected on x86")
    assert layers._onednn_linear_op() is not None
