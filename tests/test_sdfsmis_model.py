"""SD-FSMIS model parts on tiny, randomly initialised diffusers models (no downloads).

Covers (docs/sd-fsmis.md): SQI key/value fusion and its batched forms (several episodes per
step, several query slices per support pass), the weight surgery of the two 8-channel input
convolutions, Query Enhancement on crafted latents, VTCT masked pooling, the training loss and
its gradients, and the post-processing.

Sizes: images 32 x 32 -> VAE latents 16 x 16 (one downsampling); UNet attn1 layers see
N = 256 tokens (16 x 16) in the outer blocks and 64 (8 x 8) in the mid block.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fsmis.models import qe as qe_mod
from fsmis.models import sqi as sqi_mod
from fsmis.models.qe import foreground_probability, query_enhancement, query_prototype, support_prototypes
from fsmis.models.sd_fsmis import Batch, SDFSMIS, expand_conv_in, postprocess
from fsmis.models.sqi import count_sqi_layers, install_sqi
from fsmis.models.vtct import VTCT, ConvEncoder, masked_pooling

IMG = 32  # image size
LAT = 16  # latent size
CROSS = 32  # cross-attention dim

# float32 comparisons of batched vs one-at-a-time forms
ATOL = 1e-5
RTOL = 1e-5


def make_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LAT, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=CROSS, attention_head_dim=2, norm_num_groups=8)


def make_vae(seed: int = 1):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8)


def make_model(seed: int = 0) -> SDFSMIS:
    unet, vae = make_unet(seed), make_vae(seed + 1)
    torch.manual_seed(seed + 2)
    return SDFSMIS(unet, vae, VTCT(ConvEncoder(CROSS, 8), CROSS, hidden=64))


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """These models are tiny: one intra-op thread is faster than two, and much faster when the
    two cores are shared (pytest -n 2, other jobs), where OpenMP threads spin-wait."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def model():
    return make_model(0).eval()


def rect_masks(n: int, seed: int) -> torch.Tensor:
    """[n, 1, IMG, IMG] binary masks, one random rectangle each (never empty)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(n, 1, IMG, IMG)
    for i in range(n):
        y0, x0 = (int(v) for v in torch.randint(2, IMG // 2, (2,), generator=g))
        h, w = (int(v) for v in torch.randint(6, IMG // 2, (2,), generator=g))
        m[i, 0, y0:y0 + h, x0:x0 + w] = 1
    return m


def episode_inputs(b: int, k: int, q: int, seed: int):
    """Random latents and support images/masks for B episodes x K shots x Q queries."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        s_img_lat=torch.randn(b * k, 4, LAT, LAT, generator=g),
        s_mask_lat=torch.randn(b * k, 4, LAT, LAT, generator=g),
        q_img_lat=torch.randn(b * q, 4, LAT, LAT, generator=g),
        support_images=torch.rand(b * k, 1, IMG, IMG, generator=g) * 2 - 1,
        support_masks=rect_masks(b * k, seed + 1000),
    )


def select(inputs: dict, b: int, k: int, q: int) -> dict:
    """The inputs of episode b alone."""
    out = {}
    for name, t in inputs.items():
        n = q if name == "q_img_lat" else k
        out[name] = t[b * n:(b + 1) * n]
    return out


class SDPARecorder:
    """Stands in for ``torch.nn.functional`` inside fsmis.models.sqi and records every
    scaled_dot_product_attention call together with the bank's mode."""

    def __init__(self, bank):
        self.bank = bank
        self.calls = []

    def scaled_dot_product_attention(self, query, key, value, *args, **kwargs):
        self.calls.append((self.bank.mode, query.detach().clone(), key.detach().clone(), value.detach().clone()))
        return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)


# --------------------------------------------------------------------------------------------
# 1. SQI: a query attends over (1 + K) * N keys; key tensor [B*Q, heads, (1+K)*N, d]
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("b,k,q", [(1, 1, 1), (1, 3, 1), (2, 2, 3)])
def test_sqi_query_attends_over_own_and_support_keys(model, monkeypatch, b, k, q):
    assert count_sqi_layers(model.unet) == 4  # attn1 only: down 1, mid 1, up 2
    rec = SDPARecorder(model.bank)
    monkeypatch.setattr(sqi_mod, "F", rec)
    with torch.no_grad():
        model.forward_latents(**episode_inputs(b, k, q, seed=3), n_shot=k, queries_per_episode=q)

    n_layers = 4
    assert [c[0] for c in rec.calls] == ["store"] * n_layers + ["fuse"] * n_layers
    support_calls, query_calls = rec.calls[:n_layers], rec.calls[n_layers:]
    seen_n = set()
    for (_, s_q, s_k, s_v), (_, q_q, q_k, q_v) in zip(support_calls, query_calls):
        heads, n, d = s_q.shape[1:]
        seen_n.add(n)
        # support pass: plain self-attention over its own N tokens, B*K items
        assert s_q.shape == s_k.shape == s_v.shape == (b * k, heads, n, d)
        # query pass: B*Q items, each attends over (1 + K) * N keys, no mask
        assert q_q.shape == (b * q, heads, n, d)
        assert q_k.shape == q_v.shape == (b * q, heads, (1 + k) * n, d)
        # and those extra keys/values are exactly the stored ones of the query's own episode,
        # shot after shot
        for ep in range(b):
            for j in range(q):
                item = ep * q + j
                for shot in range(k):
                    sl = slice((1 + shot) * n, (2 + shot) * n)
                    torch.testing.assert_close(q_k[item, :, sl], s_k[ep * k + shot], rtol=0, atol=0)
                    torch.testing.assert_close(q_v[item, :, sl], s_v[ep * k + shot], rtol=0, atol=0)
    assert seen_n == {LAT * LAT, (LAT // 2) ** 2}
    # the bank is emptied after the forward
    assert model.bank.mode == "off" and not model.bank.store


def test_sqi_processor_fuse_key_shape_direct():
    """The processor alone: B=2 episodes x Q=3 queries, K=2 shots -> key [6, heads, 3N, d]."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8)
    bank = sqi_mod.SQIBank()
    proc = sqi_mod.SQIAttnProcessor("x", bank)
    attn.set_processor(proc)
    rec = SDPARecorder(bank)
    old = sqi_mod.F
    sqi_mod.F = rec
    try:
        bank.n_shot = 2
        bank.mode = "store"
        attn(torch.randn(4, 10, 16))
        bank.mode = "fuse"
        attn(torch.randn(6, 10, 16))
    finally:
        sqi_mod.F = old
    assert rec.calls[1][2].shape == (6, 2, 30, 8)
    with pytest.raises(RuntimeError):  # 5 query items cannot be split over 2 episodes
        bank.mode = "fuse"
        attn(torch.randn(5, 10, 16))


# --------------------------------------------------------------------------------------------
# 2. An empty bank (mode "off") is plain self-attention
# --------------------------------------------------------------------------------------------
def test_sqi_off_equals_default_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet = make_unet(5).eval()
    # perturb the weights so that every attention actually matters
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref = copy.deepcopy(unet)
    ref.set_attn_processor(AttnProcessor2_0())
    bank = install_sqi(unet)
    assert bank.mode == "off"
    assert count_sqi_layers(unet) == 4 and count_sqi_layers(ref) == 0

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, LAT, LAT, generator=g)
    c = torch.randn(2, 1, CROSS, generator=g)
    t = torch.tensor(1)
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=c).sample
        expected = ref(x, t, encoder_hidden_states=c).sample
    torch.testing.assert_close(out, expected, rtol=RTOL, atol=ATOL)
    assert not bank.store

    # control: with a non-empty bank in "fuse" mode the output does change
    with torch.no_grad():
        bank.mode = "store"
        unet(torch.randn(2, 4, LAT, LAT, generator=g), t, encoder_hidden_states=c)
        bank.mode = "fuse"
        fused = unet(x, t, encoder_hidden_states=c).sample
    bank.clear()
    assert (fused - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# 3. A query attends only to its own episode's support (batched episodes == one at a time)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("q", [1, 2])
def test_batched_episodes_equal_one_at_a_time(model, q):
    b, k = 3, 2
    inputs = episode_inputs(b, k, q, seed=11)
    with torch.no_grad():
        batched = model.forward_latents(**inputs, n_shot=k, queries_per_episode=q)
        assert batched.shape == (b * q, 4, LAT, LAT)
        for ep in range(b):
            alone = model.forward_latents(**select(inputs, ep, k, q), n_shot=k, queries_per_episode=q)
            torch.testing.assert_close(batched[ep * q:(ep + 1) * q], alone, rtol=RTOL, atol=ATOL)

        # changing episode 2's support (index 1) changes episode 2 only
        changed = {name: t.clone() for name, t in inputs.items()}
        g = torch.Generator().manual_seed(99)
        sl = slice(1 * k, 2 * k)
        changed["s_img_lat"][sl] = torch.randn(k, 4, LAT, LAT, generator=g)
        changed["s_mask_lat"][sl] = torch.randn(k, 4, LAT, LAT, generator=g)
        changed["support_images"][sl] = torch.rand(k, 1, IMG, IMG, generator=g) * 2 - 1
        changed["support_masks"][sl] = rect_masks(k, seed=4321)
        out2 = model.forward_latents(**changed, n_shot=k, queries_per_episode=q)
    for ep in (0, 2):
        torch.testing.assert_close(out2[ep * q:(ep + 1) * q], batched[ep * q:(ep + 1) * q], rtol=RTOL, atol=ATOL)
    assert (out2[q:2 * q] - batched[q:2 * q]).abs().max() > 1e-3


def test_support_keys_alone_change_the_query_output(model):
    """Only the SQI keys/values carry the support's UNet features to the query: changing the
    support mask latent (used by nothing but the support pass) changes the prediction."""
    inputs = episode_inputs(1, 1, 1, seed=12)
    with torch.no_grad():
        out = model.forward_latents(**inputs, n_shot=1, queries_per_episode=1)
        inputs["s_mask_lat"] = torch.randn_like(inputs["s_mask_lat"])
        out2 = model.forward_latents(**inputs, n_shot=1, queries_per_episode=1)
    assert (out - out2).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------
# 4. Batched evaluation chunk: one support pass, Q = 5 queries in one forward
# --------------------------------------------------------------------------------------------
def test_chunk_of_queries_equals_one_query_at_a_time_latents(model):
    q = 5
    inputs = episode_inputs(1, 1, q, seed=21)
    calls = []
    hook = model.unet.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            chunk = model.forward_latents(**inputs, n_shot=1, queries_per_episode=q)
    finally:
        hook.remove()
    assert calls == [1, q]  # one support pass (one item), one query pass (all five)
    with torch.no_grad():
        for j in range(q):
            one = dict(inputs, q_img_lat=inputs["q_img_lat"][j:j + 1])
            alone = model.forward_latents(**one, n_shot=1, queries_per_episode=1)
            torch.testing.assert_close(chunk[j:j + 1], alone, rtol=RTOL, atol=ATOL)


def test_chunk_of_queries_equals_one_query_at_a_time_probability(model):
    q = 5
    g = torch.Generator().manual_seed(22)
    s_img = torch.rand(1, 1, IMG, IMG, generator=g) * 2 - 1
    s_msk = rect_masks(1, seed=23)
    q_img = torch.rand(q, 1, IMG, IMG, generator=g) * 2 - 1
    chunk = model.predict_probability(Batch(s_img, s_msk, q_img, n_shot=1, queries_per_episode=q))
    assert chunk.shape == (q, IMG, IMG)
    assert float(chunk.min()) >= 0 and float(chunk.max()) <= 1
    for j in range(q):
        alone = model.predict_probability(Batch(s_img, s_msk, q_img[j:j + 1], n_shot=1, queries_per_episode=1))
        torch.testing.assert_close(chunk[j:j + 1], alone, rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# 5. Weight surgery
# --------------------------------------------------------------------------------------------
def test_expand_conv_in_weight_surgery():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 32, 3, padding=1).double()
    with torch.no_grad():
        conv.bias.normal_()
    new = expand_conv_in(conv, 8)
    assert new.in_channels == 8 and new.out_channels == 32
    assert new.kernel_size == conv.kernel_size and new.stride == conv.stride and new.padding == conv.padding
    assert new.weight.dtype == torch.float64
    torch.testing.assert_close(new.weight, torch.cat([conv.weight, conv.weight], 1) / 2, rtol=0, atol=0)
    torch.testing.assert_close(new.bias, conv.bias, rtol=0, atol=0)
    # a copy, not a view: training the new conv leaves the old one alone
    assert new.weight.data_ptr() != conv.weight.data_ptr() and new.bias.data_ptr() != conv.bias.data_ptr()

    a = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    b = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(new(torch.cat([a, b], 1)), conv((a + b) / 2), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new(torch.cat([a, a], 1)), conv(a), rtol=1e-12, atol=1e-12)

    with pytest.raises(ValueError):
        expand_conv_in(conv, 6)
    with pytest.raises(ValueError):
        expand_conv_in(conv, 5)


def test_model_input_convs_are_surgery_of_the_unet_conv_in():
    unet = make_unet(7)
    conv = copy.deepcopy(unet.conv_in)
    model = SDFSMIS(unet, make_vae(8), VTCT(ConvEncoder(CROSS, 8), CROSS, hidden=64))
    assert isinstance(model.unet.conv_in, nn.Identity)
    for new in (model.conv_in_support, model.conv_in_query):
        assert new.in_channels == 8
        torch.testing.assert_close(new.weight, torch.cat([conv.weight, conv.weight], 1) / 2, rtol=0, atol=0)
        torch.testing.assert_close(new.bias, conv.bias, rtol=0, atol=0)
    # two independent parameters
    assert model.conv_in_support.weight.data_ptr() != model.conv_in_query.weight.data_ptr()


# --------------------------------------------------------------------------------------------
# 6. Query Enhancement on crafted latents
# --------------------------------------------------------------------------------------------
U = torch.tensor([2.0, 0.0, 0.0, 0.0], dtype=torch.float64)
V = torch.tensor([0.0, 1.5, 0.0, 0.0], dtype=torch.float64)


def two_value_latent(mask: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor) -> torch.Tensor:
    """mask [h, w] bool -> latent [1, 4, h, w] with fg where mask, bg elsewhere."""
    m = mask.to(torch.float64)[None, None]
    return fg[None, :, None, None] * m + bg[None, :, None, None] * (1 - m)


def test_qe_support_prototypes_are_exact():
    mask = torch.zeros(LAT, LAT, dtype=torch.bool)
    mask[3:9, 4:12] = True
    s_lat = two_value_latent(mask, U, V)
    fg, bg = support_prototypes(s_lat, mask[None, None].double(), n_shot=1)
    # masked averages; the small EPS guard in the denominator is allowed a 1e-6 relative error
    torch.testing.assert_close(fg, U[None], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bg, V[None], rtol=1e-6, atol=1e-6)

    # two shots with different prototypes -> mean over shots; two episodes kept apart
    u2, v2 = torch.tensor([0.0, 0.0, 3.0, 0.0]).double(), torch.tensor([0.0, 0.0, 0.0, 1.0]).double()
    mask2 = torch.zeros(LAT, LAT, dtype=torch.bool)
    mask2[10:14, 2:5] = True
    s_lat2 = torch.cat([s_lat, two_value_latent(mask2, u2, v2), s_lat, s_lat])
    masks2 = torch.stack([mask, mask2, mask, mask])[:, None].double()
    fg, bg = support_prototypes(s_lat2, masks2, n_shot=2)
    assert fg.shape == bg.shape == (2, 4)
    torch.testing.assert_close(fg, torch.stack([(U + u2) / 2, U]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(bg, torch.stack([(V + v2) / 2, V]), rtol=1e-6, atol=1e-6)


def test_qe_query_region_equal_to_fg_prototype():
    s_mask = torch.zeros(LAT, LAT, dtype=torch.bool)
    s_mask[3:9, 4:12] = True
    s_lat = two_value_latent(s_mask, U, V)
    q_mask = torch.zeros(LAT, LAT, dtype=torch.bool)
    q_mask[8:13, 1:6] = True
    q_lat = two_value_latent(q_mask, U, V)

    fg, bg = support_prototypes(s_lat, s_mask[None, None].double(), 1)
    prob = foreground_probability(q_lat, fg, bg)[0]
    e = math.e
    # cos = 1 to the fg prototype and 0 to the bg one -> softmax([0, 1]) = e / (1 + e) = 0.731
    torch.testing.assert_close(prob[q_mask], torch.full((int(q_mask.sum()),), e / (1 + e), dtype=torch.float64))
    torch.testing.assert_close(prob[~q_mask], torch.full((int((~q_mask).sum()),), 1 / (1 + e), dtype=torch.float64))
    assert bool((prob[q_mask] > 0.7).all())

    proto_map = query_enhancement(s_lat, s_mask[None, None].double(), q_lat, n_shot=1)
    assert proto_map.shape == q_lat.shape
    torch.testing.assert_close(proto_map, U[None, :, None, None].expand_as(q_lat), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("h,w", [(8, 32), (16, 16), (12, 20)])
def test_qe_topk_fallback(h, w):
    """No pixel above 0.7: the k = floor(0.1875 * w) most probable pixels are averaged."""
    k = math.floor(0.1875 * w)
    g = torch.Generator().manual_seed(h * 100 + w)
    # pixel = r * (cos(theta) u_hat + sin(theta) v_hat), theta in [0.25, 1.45]: P(fg) =
    # sigmoid(cos(theta) - sin(theta)) < sigmoid(0.722) = 0.673, decreasing in theta
    rank = torch.randperm(h * w, generator=g)
    theta = 0.25 + 1.2 * rank.double() / (h * w)
    r = 0.5 + 1.5 * torch.rand(h * w, generator=g, dtype=torch.float64)
    u_hat, v_hat = U / U.norm(), V / V.norm()
    pix = r[:, None] * (torch.cos(theta)[:, None] * u_hat + torch.sin(theta)[:, None] * v_hat)  # [hw, 4]
    q_lat = pix.T.reshape(1, 4, h, w)

    fg, bg = U[None], V[None]
    prob = foreground_probability(q_lat, fg, bg)
    torch.testing.assert_close(prob[0].flatten(), torch.sigmoid(torch.cos(theta) - torch.sin(theta)))
    assert float(prob.max()) < 0.7

    expected_pixels = (rank < k).nonzero().flatten()  # the k smallest thetas
    assert len(expected_pixels) == k
    expected = pix[expected_pixels].mean(0)
    proto = query_prototype(q_lat, prob)
    torch.testing.assert_close(proto[0], expected, rtol=1e-10, atol=1e-10)

    # through query_enhancement with a support giving exactly those prototypes; and a second
    # query of the same chunk that has confident pixels does not use the fallback
    s_mask = torch.zeros(h, w, dtype=torch.bool)
    s_mask[: h // 2, : w // 2] = True
    s_lat = two_value_latent(s_mask, U, V)
    q_mask = torch.zeros(h, w, dtype=torch.bool)
    q_mask[1:3, 2:5] = True
    q2 = two_value_latent(q_mask, 3 * U, V)
    maps = query_enhancement(s_lat, s_mask[None, None].double(), torch.cat([q_lat, q2]), n_shot=1,
                             queries_per_episode=2)
    torch.testing.assert_close(maps[0, :, 0, 0], expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(maps[1, :, 0, 0], 3 * U, rtol=1e-6, atol=1e-6)


def test_qe_soft_masks_are_bilinearly_resized(monkeypatch):
    """A 32 x 32 support mask on 16 x 16 latents: bilinear (align_corners=False) halving is the
    2 x 2 block average, so odd-aligned edges give 0.5 weights (a soft mask, not binarised)."""
    mask = torch.zeros(1, 1, IMG, IMG, dtype=torch.float64)
    mask[0, 0, 5:21, 7:19] = 1  # rows 5..20, cols 7..18: odd start rows/cols -> half cells
    seen = {}
    real = qe_mod.support_prototypes

    def spy(s_latents, s_masks, n_shot, eps=qe_mod.EPS):
        seen["masks"] = s_masks.clone()
        return real(s_latents, s_masks, n_shot, eps)

    monkeypatch.setattr(qe_mod, "support_prototypes", spy)
    g = torch.Generator().manual_seed(0)
    s_lat = torch.randn(1, 4, LAT, LAT, generator=g, dtype=torch.float64)
    q_lat = torch.randn(1, 4, LAT, LAT, generator=g, dtype=torch.float64)
    out = query_enhancement(s_lat, mask, q_lat, n_shot=1)

    expected = F.avg_pool2d(mask, 2)
    assert seen["masks"].shape == (1, 1, LAT, LAT)
    torch.testing.assert_close(seen["masks"].double(), expected, rtol=1e-6, atol=1e-6)
    assert set(np.unique(expected.numpy()).tolist()) == {0.0, 0.25, 0.5, 1.0}
    # and the result is that of the pre-resized soft mask
    monkeypatch.setattr(qe_mod, "support_prototypes", real)
    torch.testing.assert_close(out, query_enhancement(s_lat, expected, q_lat, n_shot=1), rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 7. VTCT masked pooling
# --------------------------------------------------------------------------------------------
GRID = 4  # ConvEncoder grid at 32 px (stride 8); one cell = 8 x 8 pixels
CELL = IMG // GRID


def cells_to_mask(cells: torch.Tensor) -> torch.Tensor:
    """[GRID, GRID] bool -> [1, 1, IMG, IMG] block mask."""
    return torch.kron(cells.double(), torch.ones(CELL, CELL, dtype=torch.float64))[None, None]


def test_vtct_pooling_binarises_at_half_on_the_grid():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(1, 6, GRID, GRID, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, IMG, IMG, dtype=torch.float64)
    mask[0, 0, 0:8, 0:8] = 1  # cell (0, 0): 100 %
    mask[0, 0, 0:5, 8:16] = 1  # cell (0, 1): 40 / 64 = 62.5 %
    mask[0, 0, 8:11, 0:8] = 1  # cell (1, 0): 24 / 64 = 37.5 %
    mask[0, 0, 20:23, 20:23] = 1  # cell (2, 2): 9 / 64
    pooled = masked_pooling(feats, mask, n_shot=1)
    # binarised: cells (0,0) and (0,1) with weight 1 each, the rest with 0
    expected = (feats[0, :, 0, 0] + feats[0, :, 0, 1]) / 2
    torch.testing.assert_close(pooled[0], expected, rtol=1e-6, atol=1e-6)


def test_vtct_tiny_foreground_falls_back_to_soft_mask():
    g = torch.Generator().manual_seed(1)
    feats = torch.rand(2, 6, GRID, GRID, generator=g, dtype=torch.float64) + 0.5
    mask = torch.zeros(2, 1, IMG, IMG, dtype=torch.float64)
    mask[0, 0, 18:21, 17:20] = 1  # 9 px in cell (2, 2)
    mask[0, 0, 30:32, 30:32] = 1  # 4 px in cell (3, 3)
    mask[1, 0, 9:10, 9:10] = 1  # a single pixel in cell (1, 1)
    pooled = masked_pooling(feats, mask, n_shot=1)
    assert torch.isfinite(pooled).all()
    assert bool((pooled.norm(dim=1) > 0.1).all()), "a tiny foreground gave a zero vector"
    expected0 = (9 * feats[0, :, 2, 2] + 4 * feats[0, :, 3, 3]) / 13
    torch.testing.assert_close(pooled[0], expected0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[1], feats[1, :, 1, 1], rtol=1e-6, atol=1e-6)


def test_vtct_pooling_averages_over_shots_per_episode():
    b, k = 2, 3
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(b * k, 5, GRID, GRID, generator=g, dtype=torch.float64)
    cells = torch.rand(b * k, GRID, GRID, generator=g) > 0.5
    cells[:, 0, 0] = True  # never empty
    masks = torch.cat([cells_to_mask(c) for c in cells])
    pooled = masked_pooling(feats, masks, n_shot=k)
    assert pooled.shape == (b, 5)
    per_shot = torch.stack([feats[i][:, cells[i]].mean(1) for i in range(b * k)])  # [B*K, C]
    torch.testing.assert_close(pooled, per_shot.view(b, k, 5).mean(1), rtol=1e-6, atol=1e-6)


def test_vtct_output_is_one_token_per_episode():
    torch.manual_seed(0)
    vtct = VTCT(ConvEncoder(CROSS, 8), CROSS, hidden=64)
    b, k = 2, 3
    images = torch.rand(b * k, 3, IMG, IMG)
    masks = rect_masks(b * k, seed=5)
    assert vtct.encoder(images).shape == (b * k, CROSS, GRID, GRID)
    out = vtct(images, masks, n_shot=k)
    assert out.shape == (b, 1, CROSS)
    # episode 0 alone gives the same token
    torch.testing.assert_close(vtct(images[:k], masks[:k], n_shot=k), out[:1], rtol=RTOL, atol=ATOL)


# --------------------------------------------------------------------------------------------
# 8. / 9. Loss and gradients
# --------------------------------------------------------------------------------------------
def fixed_batch(b: int = 2, k: int = 1, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    s_msk = rect_masks(b * k, seed + 1)
    q_msk = rect_masks(b, seed + 2)
    s_img = (0.6 * s_msk - 0.3 + 0.2 * torch.rand(b * k, 1, IMG, IMG, generator=g)).clamp(-1, 1)
    q_img = (0.6 * q_msk - 0.3 + 0.2 * torch.rand(b, 1, IMG, IMG, generator=g)).clamp(-1, 1)
    return Batch(s_img, s_msk, q_img, n_shot=k, queries_per_episode=1, query_masks=q_msk)


def test_loss_falls_on_a_fixed_episode():
    """30 AdamW steps on one fixed episode (fixed generator: the same VAE posterior sample every
    step). The first few steps only learn the mean mask latent (about / 3); 30 steps at 3e-4
    reach about / 20 on this machine, asserted with margin as / 4."""
    model = make_model(3).train()
    batch = fixed_batch(b=1)
    opt = torch.optim.AdamW([{"params": model.unet_parameters(), "lr": 3e-4},
                             {"params": model.vtct_parameters(), "lr": 3e-4}], weight_decay=1e-2)
    losses = []
    for _ in range(30):
        loss = model.loss(batch, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = model.loss(batch, generator=torch.Generator().manual_seed(0)).item()
    assert all(math.isfinite(x) for x in losses)
    assert final < 0.25 * losses[0], (losses[0], final)


def test_loss_is_mse_to_negated_query_mask_latent(model):
    batch = fixed_batch(seed=7)
    with torch.no_grad():
        loss = model.loss(batch, generator=torch.Generator().manual_seed(0))
        g = torch.Generator().manual_seed(0)
        s_img = model.encode(batch.support_images, sample=True, generator=g)
        s_msk = model.encode(batch.support_masks * 2 - 1, sample=True, generator=g)
        q_img = model.encode(batch.query_images, sample=True, generator=g)
        q_msk = model.encode(batch.query_masks * 2 - 1, sample=True, generator=g)
        out = model.forward_latents(s_img, s_msk, q_img, batch.support_images, batch.support_masks, 1, 1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ((out + q_msk) ** 2).mean(), rtol=1e-5, atol=1e-7)


def test_fg_weighted_loss_weighs_latent_cells_under_the_query_mask(model):
    from fsmis.models.sd_fsmis import weighted_latent_mse

    batch = fixed_batch(seed=7)
    with torch.no_grad():
        plain = model.loss(batch, generator=torch.Generator().manual_seed(0))
        # fg_weight 1 is the released plain MSE, bit for bit, through both code paths
        assert model.loss(batch, generator=torch.Generator().manual_seed(0), fg_weight=1.0).item() == plain.item()
        out = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
        target = torch.zeros_like(out)
        masks = torch.zeros(2, 1, 16, 16)
        masks[0, 0, 0, 0] = 1  # one pixel: its 4 x 4 footprint is latent cell (0, 0) of episode 0
        torch.testing.assert_close(weighted_latent_mse(out, target, masks, 1.0), (out ** 2).mean())
        w = torch.ones(2, 1, 4, 4)
        w[0, 0, 0, 0] = 10.0
        expected = ((out ** 2) * w).sum() / (w.sum() * 4)
        torch.testing.assert_close(weighted_latent_mse(out, target, masks, 10.0), expected)
        # the weight moves the loss toward the foreground cell's error
        se_fg = (out[0, :, 0, 0] ** 2).mean()
        big = weighted_latent_mse(out, target, masks, 1e6)
        torch.testing.assert_close(big, se_fg, rtol=1e-3, atol=1e-6)
        weighted = model.loss(batch, generator=torch.Generator().manual_seed(0), fg_weight=5.0)
    assert torch.isfinite(weighted) and weighted.item() != plain.item()


def test_gradients_flow_through_the_support_pass():
    model = make_model(4).train()
    loss = model.loss(fixed_batch(seed=3), generator=torch.Generator().manual_seed(0))
    loss.backward()
    # the support pass's output is discarded: its conv gets gradients only through the SQI bank
    for conv in (model.conv_in_support, model.conv_in_query):
        assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0
        assert conv.bias.grad is not None and float(conv.bias.grad.abs().sum()) > 0
    for name, p in model.vtct.mlp.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"VTCT MLP {name} has no gradient"
    # the small trainable encoder is trained too
    enc_grads = [p.grad for p in model.vtct.encoder.parameters()]
    assert all(gr is not None for gr in enc_grads) and sum(float(gr.abs().sum()) for gr in enc_grads) > 0
    for name, p in model.vae.named_parameters():
        assert not p.requires_grad and p.grad is None, f"VAE {name} is not frozen"
    assert not model.vae.training  # frozen VAE stays in eval mode under model.train()


@pytest.mark.parametrize("b,k", [(1, 1), (2, 3)])
def test_gradient_checkpointing_gives_the_plain_gradients(b, k):
    """train.grad_checkpointing re-runs blocks in the backward pass after the SQI bank was
    cleared; the pass's mode and store travel with the forward's arguments, so the loss and
    every gradient (support pass included) equal the plain computation."""
    plain = make_model(5).train()
    ckpt = copy.deepcopy(plain)
    ckpt.unet.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(9)
    batch = Batch(torch.rand(b * k, 1, IMG, IMG, generator=g) * 2 - 1, rect_masks(b * k, 11),
                  torch.rand(b, 1, IMG, IMG, generator=g) * 2 - 1, k, 1, rect_masks(b, 12))
    losses = []
    for m in (plain, ckpt):
        loss = m.loss(batch, generator=torch.Generator().manual_seed(0))
        loss.backward()
        losses.append(loss.detach())
        assert not m.bank.store and m.bank.mode == "off"
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    names = dict(plain.named_parameters())
    checked = 0
    for name, p in ckpt.named_parameters():
        ref = names[name].grad
        if ref is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, ref, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked > 50
    assert float(ckpt.conv_in_support.weight.grad.abs().sum()) > 0


def test_model_runs_in_float64():
    """The whole model cast with .double() (a mixed/other-precision model in general) must run:
    the support images handed to the VTCT encoder must follow the model's dtype."""
    model = make_model(0).double().eval()
    inputs = {n: t.double() for n, t in episode_inputs(1, 1, 1, seed=31).items()}
    with torch.no_grad():
        out = model.forward_latents(**inputs, n_shot=1, queries_per_episode=1)
    assert out.dtype == torch.float64 and out.shape == (1, 4, LAT, LAT)


# --------------------------------------------------------------------------------------------
# 10. Post-processing
# --------------------------------------------------------------------------------------------
def test_postprocess_threshold_is_relative_to_the_chunk_maximum():
    prob = np.zeros((2, 10, 10), np.float32)
    prob[0, 2:5, 2:5] = 1.0
    prob[1, 4:7, 4:7] = 0.2  # below 0.25 x chunk max (1.0) though it is this slice's maximum
    prob[1, 0:2, 0:2] = 0.3  # above it
    out = postprocess(prob)
    assert out.dtype == bool and out.shape == prob.shape
    np.testing.assert_array_equal(out[0], prob[0] > 0.25)
    np.testing.assert_array_equal(out[1], prob[1] > 0.25)
    assert out[1, 0:2, 0:2].all() and not out[1, 4:7, 4:7].any()
    # the ratio is configurable
    out = postprocess(prob, threshold_ratio=0.1)
    assert out[1, 4:7, 4:7].all()
    # an all-zero chunk gives empty masks
    assert not postprocess(np.zeros((3, 5, 5), np.float32)).any()


def test_postprocess_absolute_floor_under_the_relative_threshold():
    prob = np.full((2, 10, 10), 0.02, np.float32)
    prob[0, 3:5, 3:5] = 0.05  # a flat output: its relative threshold (0.25 x 0.05) keeps specks
    assert postprocess(prob).any()  # released behaviour: no floor
    assert not postprocess(prob, threshold_floor=0.1).any()  # a floor above the maximum: nothing
    prob[1, 2:6, 2:6] = 0.9  # a confident region: the floor below 0.25 x max changes nothing
    np.testing.assert_array_equal(postprocess(prob, threshold_floor=0.1), postprocess(prob))
    np.testing.assert_array_equal(postprocess(prob, threshold_floor=0.5, largest_component=False), prob > 0.5)


def test_postprocess_largest_8_connected_component_per_slice():
    prob = np.zeros((3, 12, 12), np.float32)
    # slice 0: two 2x2 blobs touching only diagonally -> one 8-connected component, both kept
    prob[0, 2:4, 2:4] = 1.0
    prob[0, 4:6, 4:6] = 1.0
    # slice 1: two separated blobs -> keep the bigger (3x3), drop the 2x2
    prob[1, 1:3, 1:3] = 0.9
    prob[1, 6:9, 6:9] = 0.8
    # slice 2: a lone pixel plus a 1x4 line -> the line
    prob[2, 0, 0] = 0.9
    prob[2, 10, 3:7] = 0.9
    out = postprocess(prob)
    np.testing.assert_array_equal(out[0], prob[0] > 0)
    expected1 = np.zeros((12, 12), bool)
    expected1[6:9, 6:9] = True
    np.testing.assert_array_equal(out[1], expected1)
    expected2 = np.zeros((12, 12), bool)
    expected2[10, 3:7] = True
    np.testing.assert_array_equal(out[2], expected2)
    # filtering is configurable
    np.testing.assert_array_equal(postprocess(prob, largest_component=False), prob > 0.25)


def test_qe_released_switches_known_answers():
    """model.qe_align_corners / model.qe_eps: the released QE resizes the support mask with
    align_corners=True and divides by (mask sum + 1e-6)."""
    m = torch.zeros(1, 1, 4, 4)
    m[0, 0, 0, 0] = 1.0
    assert float(qe_mod.resize_masks(m, (2, 2), align_corners=True)[0, 0, 0, 0]) == 1.0  # the corner sample
    assert float(qe_mod.resize_masks(m, (2, 2))[0, 0, 0, 0]) == 0.25  # the mean of the 2 x 2 cell
    lat = torch.ones(1, 4, 2, 2)
    mask = torch.zeros(1, 1, 2, 2)
    mask[0, 0, 0, 0] = 1.0
    lat, mask = lat.double(), mask.double()
    fg6, _ = support_prototypes(lat, mask, 1, eps=1e-6)
    fg5, _ = support_prototypes(lat, mask, 1)
    assert float(fg6[0, 0]) == pytest.approx(1 / (1 + 1e-6), abs=1e-12)
    assert float(fg5[0, 0]) == pytest.approx(1 / (1 + 1e-5), abs=1e-12)
    # the config reaches the model
    from fsmis.config import load_config
    from fsmis.models.sd_fsmis import SDFSMISConfig

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "demo.yaml",
                      ["model.qe_align_corners=true", "model.qe_eps=1e-6"])
    assert isinstance(cfg.model, SDFSMISConfig) and cfg.model.qe_align_corners is True and cfg.model.qe_eps == 1e-6
