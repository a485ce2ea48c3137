"""VTCT preprocessing of a pretrained 224 px encoder (model.vtct_crop): the aligned crop pools the
patch under the mask; the released path pools the patch the uncropped mask grid points at; the
processor's uint8 truncation."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fsmis.models.vtct import VTCT, crop_inputs, masked_pooling, released_pooling


class GridCoords(nn.Module):
    """A frozen 224 px 'encoder' whose 16 x 16 patch features are the patch's (row, col)."""

    trainable = False
    size = 224
    out_dim = 2

    def forward(self, x):
        x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear")  # as the real encoders
        r, c = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
        return torch.stack([r, c])[None].expand(x.shape[0], 2, 16, 16)


def _block_mask():
    m = torch.zeros(1, 1, 256, 256)
    m[..., 16:30, 16:30] = 1.0  # exactly the first patch of the 224 crop (pixels 16..29)
    return m


def test_aligned_crop_pools_the_patch_under_the_mask():
    img = torch.rand(1, 3, 256, 256)
    enc = GridCoords()
    x, m = crop_inputs(img, _block_mask(), 224, "aligned")
    assert x.shape[-2:] == (224, 224) and m.shape[-2:] == (224, 224)
    assert masked_pooling(enc(x), m, 1).tolist() == [[0.0, 0.0]]


def test_released_path_pools_the_misaligned_patch():
    img = torch.rand(1, 3, 256, 256)
    enc = GridCoords()
    x, m = crop_inputs(img, _block_mask(), 224, "released")
    assert m.shape[-2:] == (256, 256)  # the mask is not cropped
    # mask cell (r, c) of the uncropped 256 grid samples pixels 16r+7, 16r+8: cell (1, 1) is inside the block
    assert released_pooling(enc(x), m, 1)[0].tolist() == pytest.approx([1.0, 1.0])
    # an empty mask gives a zero vector (released), where the aligned path refuses it
    assert released_pooling(enc(x), torch.zeros(1, 1, 256, 256), 1).tolist() == [[0.0, 0.0]]


def test_released_uint8_truncation():
    img = torch.full((1, 3, 256, 256), 0.5)
    x, _ = crop_inputs(img, _block_mask(), 224, "released")
    assert float(x[0, 0, 0, 0]) == pytest.approx(127 / 255)
    x, _ = crop_inputs(img, _block_mask(), 224, "aligned")
    assert float(x[0, 0, 0, 0]) == pytest.approx(0.5)


@pytest.mark.parametrize("crop", ["aligned", "released", "resize"])
def test_vtct_runs_with_each_crop(crop):
    torch.manual_seed(0)
    vtct = VTCT(GridCoords(), cross_attention_dim=8, hidden=16, depth=1, crop=crop)
    out = vtct(torch.rand(2, 3, 128, 128), torch.ones(2, 1, 128, 128), n_shot=1)
    assert out.shape == (2, 1, 8)
    with pytest.raises(ValueError, match="vtct_crop"):
        VTCT(GridCoords(), 8, crop="nearest")
