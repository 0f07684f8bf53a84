"""`lvd eval` and `lvd viz` with the real backbone (`pretrain.models`): a tiny ViT, saved weights."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from lvd.pretrain.eval import run_knn
from lvd.pretrain.models import build_backbone
from lvd.pretrain.viz import run_viz

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # the registry's


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _images(n, seed):
    """Image i: noise plus a bright band whose place depends on its class i % 3."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 120, (32, 32, 3), dtype=np.uint8)
        arr[:, 10 * (i % 3) : 10 * (i % 3) + 8] = 230
        out.append(arr)
    return out


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_run_knn_with_saved_tiny_vit_weights_equals_sklearn_on_its_own_cls_tokens(tmp_path):
    torch.manual_seed(1)
    model = build_backbone("vit_tiny_p4").eval()
    with torch.no_grad():  # LayerScale starts at 1e-5: open it so the blocks shape the CLS token
        for name, p in model.named_parameters():
            if name.endswith(".gamma"):
                p.fill_(1.0)
    weights = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), weights)
    train, test = _images(24, 0), _images(10, 1)
    for i, arr in enumerate(train):
        (tmp_path / "train" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "train" / f"c{i % 3}" / f"{i:02d}.png").write_bytes(_png(arr))
    for i, arr in enumerate(test):
        (tmp_path / "test" / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "test" / f"c{i % 3}" / f"{i:02d}.png").write_bytes(_png(arr))
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIG),
        OmegaConf.from_dotlist(
            [
                "model.arch=vit_tiny_p4",
                f"eval.weights={weights}",
                f"eval.train={tmp_path / 'train'}",
                f"eval.test={tmp_path / 'test'}",
                f"run_dir={tmp_path}",
                "eval.device=cpu",
                "eval.dtype=float32",
                "eval.knn.ks=[1]",
            ]
        ),
    )
    result = json.loads(run_knn(cfg).read_text())
    assert (tmp_path / "eval" / "knn.json").exists() and result["feature_dim"] == 32

    def cls_tokens(arrays):  # 32 px images at a 32 px model: no resize, only normalisation
        x = torch.tensor(np.stack([(a / 255.0 - MEAN) / STD for a in arrays]), dtype=torch.float32)
        with torch.no_grad():
            return model.forward_features(x.permute(0, 3, 1, 2))["x_norm_clstoken"].numpy()

    # Class-folder order is sorted by class, then by file name.
    def order(arrays):
        return [arrays[i] for c in range(3) for i in range(len(arrays)) if i % 3 == c]

    def y(n):
        return np.array([c for c in range(3) for i in range(n) if i % 3 == c])

    ref = KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(cls_tokens(order(train)), y(24))
    assert result["accuracy"]["1"]["top1"] == pytest.approx(ref.score(cls_tokens(order(test)), y(10)))
    assert result["accuracy"]["1"]["top1"] > 0.5  # the bands are visible even to random weights


def test_run_viz_with_register_tokens_writes_maps_of_the_input_size(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_images(1, 2)[0]).resize((48, 40)).save(tmp_path / "imgs" / "x.png")
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIG),
        OmegaConf.from_dotlist(
            [
                "model.arch=vit_tiny_p4",
                "model.overrides={num_register_tokens: 2}",
                f"run_dir={tmp_path}",
                f"viz.images=[{tmp_path / 'imgs'}]",
                "viz.device=cpu",
                "viz.crop=false",
            ]
        ),
    )
    out = run_viz(cfg)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        f"000_x_{k}.png" for k in ["input", "attn_head0", "attn_head1", "attn_mean", "pca", "pca_mask"]
    )
    for name in names:
        with Image.open(out / name) as im:
            assert im.size == (36, 32)  # shorter side 32, aspect kept: 38.4 -> 38 -> cut to 36
