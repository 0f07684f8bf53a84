"""Near-duplicate recall and precision on planted augmented copies of real photos.

Originals: quadrants of the photos shipped in scikit-image and scikit-learn. Copies: random
crops, rescaling, brightness / contrast changes and JPEG re-encoding. Distractors:
Fashion-MNIST mosaics (3×3 random items each; single items are too alike at low resolution
to be fair distractors). Embedding: a cheap deterministic descriptor built here (a blurred
grey thumbnail, mean-removed, L2-normalised), so the test checks the graph, threshold,
components and keep rule of the stage, not a model. Truth is the planting, not our output.
"""

import gzip
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from lvd.index.near_duplicates import near_duplicates_knn, near_duplicates_semdedup

# recall measured on real Fashion-MNIST images
pytestmark = pytest.mark.needs("fashion_mnist")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PHOTOS = ["astronaut", "camera", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "moon", "coins", "page"]


def photo_quadrants():
    import skimage.data
    from sklearn.datasets import load_sample_images

    arrays = [getattr(skimage.data, name)() for name in PHOTOS] + list(load_sample_images().images)
    out = []
    for array in arrays:
        im = Image.fromarray(array).convert("RGB")
        w, h = im.size
        out += [
            im.crop(box)
            for box in ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h))
        ]
    return out


def fashion_mosaics(n, seed=1):
    with gzip.open(FASHION_MNIST) as f:
        items = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tiles = items[rng.choice(len(items), 9, replace=False)]
        mosaic = np.vstack([np.hstack(tiles[r * 3 : r * 3 + 3]) for r in range(3)])
        out.append(Image.fromarray(mosaic).convert("RGB").resize((168, 168), Image.BICUBIC))
    return out


def augment(im, rng, min_crop=0.92):
    w, h = im.size
    f = rng.uniform(min_crop, 1.0)
    cw, ch = int(w * f), int(h * f)
    x0, y0 = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
    im = im.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.uniform(0.5, 1.2)
    im = im.resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.BILINEAR)
    im = ImageEnhance.Brightness(im).enhance(rng.uniform(0.8, 1.2))
    im = ImageEnhance.Contrast(im).enhance(rng.uniform(0.8, 1.2))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=int(rng.integers(30, 90)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def thumbnail_embedding(im, side=10):
    g = np.asarray(im.convert("L").resize((side, side), Image.BOX), np.float32).ravel()
    g -= g.mean()
    return g / max(float(np.linalg.norm(g)), 1e-6)


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    images, group = [], []
    for i, original in enumerate(photo_quadrants()):
        images.append(original)
        group.append(i)
        for _ in range(1 + i % 3):
            images.append(augment(original, rng))
            group.append(i)
    distractors = fashion_mosaics(300)
    images += distractors
    group += list(range(10_000, 10_000 + len(distractors)))
    order = rng.permutation(len(images))  # copies must not sit next to their originals
    x = np.stack([thumbnail_embedding(images[j]) for j in order]).astype(np.float32)
    pixels = np.array([images[j].size[0] * images[j].size[1] for j in order])
    return x, np.array(group)[order], pixels


def scores(group, component, keep):
    """Pair recall / precision of the components, and whether removals are all planted copies."""
    same = group[:, None] == group[None, :]
    linked = component[:, None] == component[None, :]
    np.fill_diagonal(same, False)
    np.fill_diagonal(linked, False)
    true_pairs = (same & linked).sum()
    recall = true_pairs / same.sum()
    precision = true_pairs / max(linked.sum(), 1)
    # every removed image has a planted relative that is kept in its component
    removed_ok = np.mean(
        [bool((keep & (group == group[i]) & (component == component[i])).any()) for i in np.flatnonzero(~keep)]
    )
    return recall, precision, removed_ok


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_knn_dedup_finds_planted_copies(planted, backend):
    x, group, pixels = planted
    component, keep = near_duplicates_knn(x, pixels, k=16, threshold=0.87, backend=backend)
    recall, precision, removed_ok = scores(group, component, keep)
    assert recall >= 0.93 and precision >= 0.97, (recall, precision)
    assert removed_ok >= 0.95
    # keep rule: the kept image of each component is its largest
    for c in np.unique(component[~keep]):
        members = np.flatnonzero(component == c)
        assert pixels[members[keep[members]]][0] == pixels[members].max()


def test_semdedup_finds_planted_copies(planted):
    x, group, pixels = planted
    component, keep = near_duplicates_semdedup(x, pixels, threshold=0.87, clusters=8, seed=0)
    recall, precision, _ = scores(group, component, keep)
    assert recall >= 0.85 and precision >= 0.9, (recall, precision)
