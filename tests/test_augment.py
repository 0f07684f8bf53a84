"""Multi-crop augmentation on batches (kornia): shapes, per-image alignment, determinism."""

from __future__ import annotations

import numpy as np
import torch

from lvd.pretrain.train.augment import MultiCrop

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def test_shapes_and_counts():
    mc = MultiCrop(32, 16, n_local=3, mean=MEAN, std=STD)
    out = mc(torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8))
    assert [g.shape for g in out.global_crops] == [torch.Size([5, 3, 32, 32])] * 2
    assert [c.shape for c in out.local_crops] == [torch.Size([5, 3, 16, 16])] * 3
    assert all(g.dtype == torch.float32 for g in out.global_crops + out.local_crops)


def test_every_crop_stays_with_its_image():
    # Black stays black under crop, flip, multiplicative brightness, contrast around the
    # image mean, saturation, hue, greyscale, blur and solarisation (0 < threshold): every
    # crop of image 0 must be exactly the normalised black, in every view and every local
    # crop; crops of the bright images never are.
    torch.manual_seed(0)
    images = torch.full((4, 3, 48, 48), 200, dtype=torch.uint8)
    images[0] = 0
    images[2, :, :, :24] = 0  # half black, half bright
    mc = MultiCrop(32, 16, n_local=4, mean=MEAN, std=STD)
    out = mc(images)
    black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(3, 1, 1)
    for crop in out.global_crops + out.local_crops:
        assert torch.allclose(crop[0], black.expand_as(crop[0]), atol=1e-5)
        for i in (1, 3):
            assert not torch.allclose(crop[i], black.expand_as(crop[i]), atol=1e-2)


def test_crops_vary_and_are_reproducible_under_a_seed():
    images = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    mc = MultiCrop(32, 16, n_local=2, mean=MEAN, std=STD)
    torch.manual_seed(5)
    a = mc(images)
    torch.manual_seed(5)
    b = mc(images)
    c = mc(images)
    assert all(torch.equal(x, y) for x, y in zip(a.global_crops + a.local_crops, b.global_crops + b.local_crops))
    assert not torch.equal(a.global_crops[0], c.global_crops[0])
    assert not torch.equal(a.global_crops[0], a.global_crops[1])


def test_normalisation_of_an_unaugmented_image():
    # A uniformly grey image is unchanged by every step up to the normalisation except
    # brightness/contrast/saturation; with jitter strengths at 0 the output is (v - mean)/std.
    import kornia.augmentation as K

    mc = MultiCrop(32, 16, n_local=1, mean=MEAN, std=STD)
    for view in (mc.global1, mc.global2, mc.local):
        for i, step in enumerate(view):
            if isinstance(step, K.ColorJitter):
                view[i] = K.ColorJitter(0.0, 0.0, 0.0, 0.0, p=0.0)
    grey = torch.full((2, 3, 40, 40), 64, dtype=torch.uint8)
    out = mc(grey)
    expected = ((64 / 255 - torch.tensor(MEAN)) / torch.tensor(STD)).view(1, 3, 1, 1)
    for crop in out.global_crops + out.local_crops:
        np.testing.assert_allclose(crop.numpy(), expected.expand_as(crop).numpy(), atol=1e-5)
