"""DINOv2 losses, centering and heads against hand-computed values and numpy/scipy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from scipy.special import log_softmax, softmax

from lvd.pretrain.train.centering import CenterEMA, sinkhorn_knopp, softmax_center
from lvd.pretrain.train.heads import DINOHead
from lvd.pretrain.train.losses import dino_loss, ibot_patch_loss, koleo_loss
from lvd.pretrain.train.ssl import MaskInfo, SSLObjective, ema_update


def t(x):
    return torch.tensor(x, dtype=torch.float32)


# -- DINO cross-entropy ---------------------------------------------------------------------


def test_dino_loss_hand_computed():
    # K=2, B=1, student temperature 1. Student logits (0, 0) give log-probs (-ln2, -ln2) and
    # logits (ln3, 0) give probs (3/4, 1/4).
    teacher = [t([[1.0, 0.0]]), t([[0.0, 1.0]])]
    student = [t([[0.0, 0.0]]), t([[0.0, 0.0]]), t([[math.log(3.0), 0.0]])]
    # pairs (teacher i, student v != i): (0,1): ln2  (0,2): -ln(3/4)  (1,0): ln2  (1,2): -ln(1/4)
    expected = (math.log(2) + -math.log(0.75) + math.log(2) + -math.log(0.25)) / 4
    got = dino_loss(student, teacher, student_temp=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_matches_scipy_reference():
    rng = np.random.default_rng(0)
    b, k, n_global, n_local, temp = 3, 5, 2, 3, 0.1
    s = rng.normal(size=(n_global + n_local, b, k))
    tp = softmax(rng.normal(size=(n_global, b, k)), axis=-1)
    terms = [
        -(tp[i] * log_softmax(s[v] / temp, axis=-1)).sum(-1).mean()
        for i in range(n_global)
        for v in range(n_global + n_local)
        if v != i
    ]
    got = dino_loss([t(x) for x in s], [t(x) for x in tp], student_temp=temp)
    assert got.item() == pytest.approx(np.mean(terms), rel=1e-5)


def test_dino_loss_needs_two_views():
    with pytest.raises(ValueError):
        dino_loss([t([[0.0, 1.0]])], [t([[0.5, 0.5]])])


# -- iBOT -----------------------------------------------------------------------------------


def test_ibot_patch_loss_hand_computed():
    # Three masked patches: two from image 0 (weight 1/2 each), one from image 1 (weight 1);
    # image 2 has none but counts in the denominator. Student temperature 1, K = 2.
    student = t([[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]])
    teacher = t([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    weights = t([0.5, 0.5, 1.0])
    expected = (0.5 * math.log(2) + 0.5 * -math.log(0.75) + 1.0 * math.log(2)) / 3
    got = ibot_patch_loss(student, teacher, weights, n_images=3, student_temp=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_mask_info_weights():
    masks = torch.tensor([[True, True, False], [False, False, True], [False, False, False]])
    info = MaskInfo.from_masks(masks)
    assert info.indices.tolist() == [0, 1, 5]
    assert info.weights.tolist() == [0.5, 0.5, 1.0]
    assert info.n_images == 3


# -- centering ------------------------------------------------------------------------------


def test_softmax_center_and_ema_update():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 6)).astype(np.float32)
    center = CenterEMA(6, momentum=0.9)
    center.center.copy_(t(rng.normal(size=(1, 6))))
    c0 = center.center.numpy().astype(np.float64).copy()
    probs = softmax_center(t(logits), center.center, temp=0.04)
    np.testing.assert_allclose(probs.numpy(), softmax((logits - c0) / 0.04, axis=-1), rtol=1e-4, atol=1e-6)
    center.update(t(logits))
    np.testing.assert_allclose(
        center.center.numpy(), 0.9 * c0 + 0.1 * logits.mean(0, keepdims=True), rtol=1e-6, atol=1e-7
    )


def _sinkhorn_numpy(logits, temp, n_iters):
    q = np.exp((logits - logits.max()) / temp).T.astype(np.float64)  # K x B
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iters):
        q /= q.sum(axis=1, keepdims=True) * k
        q /= q.sum(axis=0, keepdims=True) * b
    return (q * b).T


@pytest.mark.parametrize("n_iters", [3, 200])
def test_sinkhorn_knopp_doubly_stochastic(n_iters):
    rng = np.random.default_rng(2)
    b, k = 16, 8
    logits = rng.normal(size=(b, k)).astype(np.float32) * 3
    q = sinkhorn_knopp(t(logits), temp=0.5, n_iters=n_iters).double().numpy()
    np.testing.assert_allclose(q, _sinkhorn_numpy(logits, 0.5, n_iters), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)  # each sample's target is a distribution
    if n_iters == 200:  # converged: every prototype gets B/K of the mass
        np.testing.assert_allclose(q.sum(0), b / k, rtol=1e-3)
    assert (q >= 0).all()


def test_sinkhorn_knopp_is_shift_invariant_and_finite_at_low_temperature():
    logits = t([[100.0, 0.0], [0.0, 100.0], [50.0, 50.0]])
    q = sinkhorn_knopp(logits, temp=0.01, n_iters=3)
    assert torch.isfinite(q).all()
    np.testing.assert_allclose(q.numpy(), sinkhorn_knopp(logits + 1000.0, temp=0.01, n_iters=3).numpy(), atol=1e-6)


# -- KoLeo ----------------------------------------------------------------------------------


def test_koleo_matches_brute_force():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(10, 4))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = cdist(xn, xn)
    np.fill_diagonal(d, np.inf)
    expected = -np.log(d.min(1)).mean()
    assert koleo_loss(t(x)).item() == pytest.approx(expected, rel=1e-4)


@pytest.mark.parametrize("n", [2, 4])
def test_koleo_finite_with_repeated_vectors(n):
    x = torch.ones(n, 8, requires_grad=True)  # every row identical: nearest distance 0
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)  # one duplicate pair
    loss = koleo_loss(y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(y.grad).all()


def test_koleo_single_row_is_zero():
    assert koleo_loss(torch.randn(1, 5)).item() == 0.0


# -- heads and EMA --------------------------------------------------------------------------


def test_dino_head_prototypes_are_weight_normalised():
    torch.manual_seed(0)
    head = DINOHead(8, out_dim=5, hidden_dim=16, bottleneck_dim=4, nlayers=3)
    x = torch.randn(3, 8)
    z = torch.nn.functional.normalize(head.mlp(x), dim=-1).detach().numpy()
    v = head.last_layer.weight_v.detach().numpy()
    assert torch.equal(head.last_layer.weight_g, torch.ones(5, 1))  # the gain starts at 1, as in dinov2
    expected = z @ (v / np.linalg.norm(v, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        head.last_layer.weight_v.mul_(7.0)  # the scale of a prototype's direction does not matter
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(head(x).detach().numpy()).max() <= 1.0 + 1e-6  # cosine similarities


def _gelu(a):
    from scipy.special import erf

    return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))


def _dinov2_head_state(rng, in_dim=6, hidden=10, bottleneck=4, k=7):
    """A head state dict in dinov2's layout (3-layer MLP, weight_norm prototypes), trained-looking gains."""
    shapes = {"mlp.0": (hidden, in_dim), "mlp.2": (hidden, hidden), "mlp.4": (bottleneck, hidden)}
    state = {}
    for name, shape in shapes.items():
        state[f"{name}.weight"] = rng.normal(0, 0.3, shape).astype(np.float32)
        state[f"{name}.bias"] = rng.normal(0, 0.1, shape[0]).astype(np.float32)
    state["last_layer.weight_g"] = rng.uniform(0.5, 3.0, (k, 1)).astype(np.float32)
    state["last_layer.weight_v"] = rng.normal(0, 1.0, (k, bottleneck)).astype(np.float32)
    return state


def _numpy_head(state, x):
    """The dinov2 head by hand in float64: Linear-GELU-Linear-GELU-Linear, L2 normalise, g * v / |v|."""
    s = {k: v.astype(np.float64) for k, v in state.items()}
    h = _gelu(x @ s["mlp.0.weight"].T + s["mlp.0.bias"])
    h = _gelu(h @ s["mlp.2.weight"].T + s["mlp.2.bias"])
    z = h @ s["mlp.4.weight"].T + s["mlp.4.bias"]
    z = z / np.linalg.norm(z, axis=1, keepdims=True)
    v = s["last_layer.weight_v"]
    return z @ (s["last_layer.weight_g"] * v / np.linalg.norm(v, axis=1, keepdims=True)).T


def test_a_dinov2_head_state_dict_loads_strictly_and_gives_the_hand_computed_logits():
    rng = np.random.default_rng(0)
    state = _dinov2_head_state(rng)
    head = DINOHead(6, out_dim=7, hidden_dim=10, bottleneck_dim=4, nlayers=3)
    assert set(head.state_dict()) == set(state)  # the same key names and shapes as dinov2's head
    head.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    x = rng.normal(0, 1, (5, 6)).astype(np.float32)
    got = head(torch.from_numpy(x)).detach().numpy()
    want = _numpy_head(state, x.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # With the gains forced to 1 (what the fixed-gain layer computed) the logits differ: the gain matters.
    assert np.abs(want - _numpy_head({**state, "last_layer.weight_g": np.ones((7, 1), np.float32)}, x)).max() > 0.1
    # torch's parametrized weight_norm stores the same two tensors under other names.
    renamed = {
        (
            "last_layer.parametrizations.weight.original0"
            if k == "last_layer.weight_g"
            else "last_layer.parametrizations.weight.original1"
            if k == "last_layer.weight_v"
            else k
        ): torch.from_numpy(v)
        for k, v in state.items()
    }
    again = DINOHead(6, out_dim=7, hidden_dim=10, bottleneck_dim=4, nlayers=3)
    again.load_state_dict(renamed, strict=True)
    np.testing.assert_allclose(again(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)


def test_an_older_lvd_head_without_the_gain_loads_with_gain_one():
    rng = np.random.default_rng(1)
    state = _dinov2_head_state(rng)
    old = {k: torch.from_numpy(v) for k, v in state.items() if not k.startswith("last_layer.")}
    old["last_layer.weight"] = torch.from_numpy(state["last_layer.weight_v"])  # the fixed-gain layout
    head = DINOHead(6, out_dim=7, hidden_dim=10, bottleneck_dim=4, nlayers=3)
    head.load_state_dict(old, strict=True)
    assert torch.equal(head.last_layer.weight_g, torch.ones(7, 1))
    x = rng.normal(0, 1, (5, 6)).astype(np.float32)
    want = _numpy_head({**state, "last_layer.weight_g": np.ones((7, 1), np.float32)}, x.astype(np.float64))
    np.testing.assert_allclose(head(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="weight_v"):  # still strict: a missing prototype matrix is named
        head.load_state_dict({k: v for k, v in old.items() if k != "last_layer.weight"})


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [False, True])
def test_the_prototype_gain_trains_unless_frozen(frozen):
    torch.manual_seed(0)
    head = DINOHead(6, out_dim=7, hidden_dim=10, bottleneck_dim=4, nlayers=3, norm_last_layer=frozen)
    g = head.last_layer.weight_g
    assert g.requires_grad is (not frozen)
    z = torch.nn.functional.normalize(head.mlp(torch.randn(5, 6)), dim=-1).detach()
    head.last_layer(z).square().sum().backward()
    if frozen:
        assert g.grad is None
    else:  # d/dg_k sum_b (g_k u_bk)^2 = 2 g_k sum_b u_bk^2, with u the unit-prototype logits
        v = head.last_layer.weight_v.detach()
        u = z @ torch.nn.functional.normalize(v, dim=1).T
        torch.testing.assert_close(g.grad, 2 * g.detach() * u.square().sum(0, keepdim=True).T)


def test_ema_update_exact():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    # Dyadic values and momentum 0.75: every product and sum is exact in float32.
    with torch.no_grad():
        for p in list(student.parameters()) + list(teacher.parameters()):
            p.copy_(torch.randint(-64, 64, p.shape).float() / 16)
    expected = [
        0.75 * tp.detach().double() + 0.25 * sp.detach().double()
        for tp, sp in zip(teacher.parameters(), student.parameters())
    ]
    ema_update(teacher, student, 0.75)
    for tp, e in zip(teacher.parameters(), expected):
        assert torch.equal(tp.detach().double(), e)
    # and a general momentum, against float64
    s0 = [p.detach().double().clone() for p in student.parameters()]
    t0 = [p.detach().double().clone() for p in teacher.parameters()]
    ema_update(teacher, student, 0.996)
    for tp, a, b in zip(teacher.parameters(), t0, s0):
        np.testing.assert_allclose(tp.detach().double().numpy(), (0.996 * a + 0.004 * b).numpy(), rtol=1e-6, atol=1e-7)


def test_objective_dino_v1_has_only_dino_term():
    obj = SSLObjective(4, None, centering="softmax", ibot_weight=0.0, koleo_weight=0.0)
    b = 2
    student = {"dino": torch.randn(3 * b, 4), "cls": torch.randn(2 * b, 8)}
    teacher = {"dino": torch.randn(2 * b, 4)}
    out = obj(student, teacher, n_global=2, teacher_temp=0.04, mask=None)
    assert set(out) == {"dino", "total"}
    assert out["total"].item() == pytest.approx(out["dino"].item())
    assert not torch.equal(obj.dino_center.center, torch.zeros(1, 4))  # the centre moved
