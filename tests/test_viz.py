"""Attention maps and patch PCA, with a stand-in ViT whose tokens are built from the pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.filters import threshold_otsu

from lvd.pretrain.eval.features import Preprocessing
from lvd.pretrain.viz import attention_mass_mask, cls_attention, otsu_threshold, patch_pca, visualise

PATCH = 4


class PixelTokenViT(torch.nn.Module):
    """dinov2's API over hand-made features: a patch's token encodes its mean brightness.

    Bright patches get direction `u`, dark ones direction `v`, plus a little fixed noise, so
    the object (bright) and the background (dark) are the main axis of variation. The CLS
    row of head i attends to patch j in proportion to exp((i + 1) * brightness_j).
    """

    patch_size = PATCH
    num_register_tokens = 1
    embed_dim = 12
    num_heads = 3

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.u = torch.randn(self.embed_dim, generator=gen)
        self.v = torch.randn(self.embed_dim, generator=gen)
        self.noise = torch.randn(4096, self.embed_dim, generator=gen) * 0.05

    def _brightness(self, x):
        return torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), PATCH).flatten(1)  # B × N

    def forward_features(self, x, masks=None):
        b = self._brightness(x)
        b = (b - b.min()) / (b.max() - b.min())
        tokens = b[..., None] * self.u + (1 - b[..., None]) * self.v + self.noise[: b.shape[1]]
        return {
            "x_norm_clstoken": tokens.mean(1),
            "x_norm_patchtokens": tokens,
            "x_norm_regtokens": tokens[:, :1],
            "x_prenorm": None,
            "masks": masks,
        }

    def get_last_selfattention(self, x):
        b = self._brightness(x)
        bsz, t = len(x), b.shape[1] + 2
        attn = torch.full((bsz, self.num_heads, t, t), 1.0 / t)
        for h in range(self.num_heads):
            logits = torch.cat([torch.zeros(bsz, 2), (h + 1) * b], dim=1)  # CLS, register, patches
            attn[:, h, 0] = logits.softmax(-1)
        return attn


def _square_image(h=32, w=40, box=(8, 24, 12, 28)):
    img = np.full((h, w, 3), 30, dtype=np.uint8)
    top, bottom, left, right = box
    img[top:bottom, left:right] = 220
    return img


PREP = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_cls_attention_drops_cls_and_registers_and_keeps_the_grid():
    model = PixelTokenViT()
    x = torch.from_numpy(_square_image()).permute(2, 0, 1)[None].float() / 255
    maps = cls_attention(model, x)
    assert maps.shape == (1, 3, 8, 10)
    ref = model.get_last_selfattention(x)[0, :, 0, 2:].reshape(3, 8, 10).numpy()
    np.testing.assert_allclose(maps[0], ref)
    # The object's patches (rows 2..5, cols 3..6) get the most attention in every head.
    for head in maps[0]:
        assert head[2:6, 3:7].min() > head[0].max()


def test_pca_foreground_mask_is_the_object_whatever_the_sign():
    model = PixelTokenViT()
    images = [_square_image(), _square_image(box=(4, 16, 4, 20))]
    grids = []
    for img in images:
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
        grids.append(model.forward_features(x)["x_norm_patchtokens"][0].reshape(8, 10, -1).numpy())
    for sign in (1.0, -1.0):  # negated features flip the first component: the mask must not flip
        pca = patch_pca([sign * g for g in grids])
        for img, mask in zip(images, pca.masks):
            object_patches = img[::PATCH, ::PATCH, 0] > 128
            np.testing.assert_array_equal(mask, object_patches)
        for mask, rgb in zip(pca.masks, pca.colours):
            assert rgb.shape == (8, 10, 3)
            assert (rgb[~mask] == 0).all() and rgb.min() >= 0 and rgb.max() <= 1
        assert max(rgb[mask].max() for mask, rgb in zip(pca.masks, pca.colours)) == pytest.approx(1.0)


def test_otsu_threshold_matches_scikit_image():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.2, 0.05, 700), rng.normal(0.7, 0.1, 300)])
    one_bin = np.ptp(values) / 256 * 1.01  # skimage returns a bin centre, we return its upper edge
    assert otsu_threshold(values) == pytest.approx(threshold_otsu(values, nbins=256), abs=one_bin)


def test_visualise_writes_pngs_of_the_input_size(tmp_path):
    images = {"a": _square_image(), "b": _square_image(h=24, w=24, box=(8, 16, 8, 16))}
    written = visualise(PixelTokenViT(), images, PREP, tmp_path)
    names = sorted(p.name for p in written)
    expected = sorted(
        f"{n}_{kind}.png"
        for n in images
        for kind in ["input", "attn_head0", "attn_head1", "attn_head2", "attn_mean", "pca", "pca_mask"]
    )
    assert names == expected and sorted(p.name for p in tmp_path.iterdir()) == expected
    for name, img in images.items():
        for kind in ["input", "attn_head1", "pca", "pca_mask"]:
            with Image.open(tmp_path / f"{name}_{kind}.png") as png:
                assert png.size == (img.shape[1], img.shape[0])
    mask = np.asarray(Image.open(tmp_path / "a_pca_mask.png")) > 0
    np.testing.assert_array_equal(mask, _square_image()[..., 0] > 128)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a_input.png")), images["a"])


def test_attention_mass_keeps_the_fewest_top_patches_reaching_the_mass():
    head = np.array([[0.05, 0.5], [0.3, 0.15]])
    np.testing.assert_array_equal(attention_mass_mask(head, 0.6), [[False, True], [True, False]])
    np.testing.assert_array_equal(attention_mass_mask(head, 0.5), [[False, True], [False, False]])
    assert attention_mass_mask(head, 1.0).all()
    rng = np.random.default_rng(0)
    big = rng.random((7, 9))
    for mass in (0.1, 0.37, 0.9):  # brute force: grow the set from the top until it holds the mass
        kept, total = np.zeros(big.size, bool), 0.0
        for i in np.argsort(-big.ravel()):
            if total >= mass * big.sum():
                break
            kept[i], total = True, total + big.ravel()[i]
        np.testing.assert_array_equal(attention_mass_mask(big, mass).ravel(), kept)


def test_visualise_draws_attention_mass_masks_when_asked(tmp_path):
    visualise(PixelTokenViT(), {"a": _square_image()}, PREP, tmp_path, attention_mass=0.9)
    obj = np.zeros((32, 40), bool)
    obj[8:24, 12:28] = True
    # Below 90% of a head's attention on the object, its mask must cover the object and more;
    # above, it must hold object patches only.
    x = ((torch.from_numpy(_square_image()).permute(2, 0, 1)[None].float() / 255) - 0.5) / 0.25
    maps = cls_attention(PixelTokenViT(), x)[0]
    on_object = maps[:, 2:6, 3:7].sum((1, 2)) / maps.sum((1, 2))
    assert on_object.min() < 0.9 < on_object.max()  # both cases occur
    for i, fraction in enumerate(on_object):
        covers_object = fraction < 0.9
        with Image.open(tmp_path / f"a_attn_head{i}_mass.png") as im:
            assert im.size == (40, 32)
            kept = np.asarray(im) > 0
        if covers_object:
            assert kept[obj].all() and kept[~obj].any()
        else:
            assert kept.any() and not kept[~obj].any()
