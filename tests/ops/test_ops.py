"""The torch ops against float64 formulas written independently here."""

import math

import torch

from metallic.ops import RopeTable, attention, gated_activation, rms_norm
from metallic.ops.rope import rotate


def test_rms_norm_matches_float64():
    x = torch.randn(5, 64) * 30
    w = torch.randn(64)
    ref = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w.double()
    torch.testing.assert_close(rms_norm(x, w, 1e-6).double(), ref, rtol=1e-5, atol=1e-5)


def _rope_reference(x, pos, base, neox):
    d = x.shape[-1]
    out = x.double().clone()
    for t in range(x.shape[0]):
        for i in range(d // 2):
            theta = pos[t] * base ** (-2 * i / d)
            c, s = math.cos(theta), math.sin(theta)
            a, b = (i, i + d // 2) if neox else (2 * i, 2 * i + 1)
            xa, xb = x[t, :, a].double(), x[t, :, b].double()
            out[t, :, a] = xa * c - xb * s
            out[t, :, b] = xa * s + xb * c
    return out


def test_rope_both_layouts():
    x = torch.randn(4, 3, 16)
    pos = torch.tensor([0, 1, 7, 300])
    for neox in (True, False):
        got = rotate(x, *RopeTable(16, 10000.0).angles(pos), 16, neox)
        ref = _rope_reference(x, pos, 10000.0, neox)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_rope_partial_dims_pass_through():
    x = torch.randn(2, 1, 16)
    got = rotate(x, *RopeTable(8, 10000.0).angles(torch.tensor([3, 4])), 8, True)
    assert torch.equal(got[..., 8:], x[..., 8:])


def _attention_reference(q, k, v, qp, kp, scale, window):
    out = torch.zeros(q.shape, dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    for t in range(q.shape[0]):
        for h in range(q.shape[1]):
            ok = [
                j
                for j in range(k.shape[0])
                if kp[j] <= qp[t] and (not window or qp[t] - kp[j] < window)
            ]
            s = torch.stack([q[t, h].double() @ k[j, h // rep].double() * scale for j in ok])
            p = torch.softmax(s, 0)
            out[t, h] = sum(p[i] * v[j, h // rep].double() for i, j in enumerate(ok))
    return out


def test_attention_causal_window_gqa():
    q, k, v = torch.randn(6, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    qp = torch.arange(4, 10)
    kp = torch.arange(10)
    for window in (0, 3):
        got = attention(q, k, v, qp, kp, 0.3, window)
        ref = _attention_reference(q, k, v, qp, kp, 0.3, window)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)


def test_gated_activations():
    g, u = torch.randn(10), torch.randn(10)
    gd = g.double()
    silu = gd / (1 + torch.exp(-gd)) * u.double()
    gelu = (
        0.5 * gd * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gd + 0.044715 * gd**3))) * u.double()
    )
    torch.testing.assert_close(gated_activation(g, u, "silu").double(), silu)
    torch.testing.assert_close(gated_activation(g, u, "gelu_tanh").double(), gelu)


def test_llama3_frequency_factors_and_linear_scaling():
    """rope_freqs.weight divides each frequency; rope.scaling.type linear divides positions."""
    factors = torch.tensor([1.0, 2.0, 4.0, 8.0])
    table = RopeTable(8, 10000.0, freq_factors=factors, linear_scale=2.0)
    expected = 10000.0 ** (-torch.arange(0, 8, 2, dtype=torch.float64) / 8) / factors.double() / 2
    torch.testing.assert_close(table.inv_freq, expected)
    cos, _ = table.angles(torch.tensor([5]))
    torch.testing.assert_close(
        cos.flatten().double(), torch.cos(5 * expected), rtol=1e-6, atol=1e-6
    )
