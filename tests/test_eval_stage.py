"""`run_knn`, `run_linear`, `run_viz` end to end on tiny labelled sources, with a stand-in backbone."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from omegaconf import OmegaConf
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

from lvd.pretrain.eval import run_knn, run_linear
from lvd.pretrain.eval.features import Preprocessing
from lvd.pretrain.viz import run_viz

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"
COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}
PREP = Preprocessing(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


class MeanColourViT(torch.nn.Module):
    """dinov2's API; CLS = mean colour of the image, patch tokens = mean colour of each patch."""

    patch_size = 4
    num_register_tokens = 0

    def forward_features(self, x, masks=None):
        patches = torch.nn.functional.avg_pool2d(x, self.patch_size).flatten(2).transpose(1, 2)
        return {
            "x_norm_clstoken": x.mean((2, 3)),
            "x_norm_patchtokens": patches,
            "x_norm_regtokens": patches[:, :0],
            "x_prenorm": None,
            "masks": masks,
        }

    def get_last_selfattention(self, x):
        n = (x.shape[-1] // self.patch_size) * (x.shape[-2] // self.patch_size)
        return torch.full((len(x), 2, n + 1, n + 1), 1.0 / (n + 1))


def _png(rgb, rng, size=20):
    arr = np.clip(np.array(rgb) + rng.normal(0, 60, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """A class-folder training set and a shard test set (labels 0..2 = sorted colour names)."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        (tmp_path / "train" / name).mkdir(parents=True)
        for i in range(12):
            (tmp_path / "train" / name / f"{i:02d}.png").write_bytes(_png(rgb, rng))
    (tmp_path / "train" / "red" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with wds.TarWriter(str(tmp_path / "test-000000.tar")) as sink:
        for i in range(30):
            name = sorted(COLOURS)[i % 3]
            sink.write({"__key__": f"t{i:03d}", "png": _png(COLOURS[name], rng), "cls": name.encode()})
    monkeypatch.setattr("lvd.pretrain.eval.stage.load_model", lambda *a, **k: (MeanColourViT(), PREP))
    cfg = OmegaConf.load(CONFIG)
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"eval.train={tmp_path / 'train'}",
                f"eval.test={tmp_path / 'test-000000.tar'}",
                f"eval.output_dir={tmp_path / 'out'}",
                "eval.device=cpu",
                "eval.batch_size=7",
                "eval.knn.ks=[1,5,50]",
                "eval.linear.epochs=20",
                "eval.linear.batch_size=16",
            ]
        ),
    )
    return cfg, tmp_path


def _mean_colours(folder_or_tar_samples):
    """Reference features computed independently: mean of the normalised 16 px centre crop."""
    from lvd.pretrain.data.decode import load_resized

    return np.stack(
        [
            ((np.asarray(load_resized(d, 16), dtype=np.float32) / 255 - 0.5) / 0.25).mean((0, 1))
            for d in folder_or_tar_samples
        ]
    )


def _reference_data(tmp_path):
    train_files = sorted(p for p in (tmp_path / "train").rglob("*.png") if "broken" not in p.name)
    train_y = np.array([sorted(COLOURS).index(p.parent.name) for p in train_files])
    test = list(wds.WebDataset(str(tmp_path / "test-000000.tar"), shardshuffle=False))
    test_y = np.array([sorted(COLOURS).index(s["cls"].decode()) for s in test])
    return (_mean_colours(p.read_bytes() for p in train_files), train_y, _mean_colours(s["png"] for s in test), test_y)


def test_run_knn_writes_accuracies_equal_to_sklearn_on_the_same_features(sources):
    cfg, tmp_path = sources
    path = run_knn(cfg)
    result = json.loads(path.read_text())
    assert result["n_train"] == 36 and result["n_test"] == 30 and result["classes"] == sorted(COLOURS)
    assert result["skipped_undecodable"] == {"train": ["red/zz-broken.png"], "test": []}
    assert set(result["accuracy"]) == {"1", "5", "50"}
    tr_x, tr_y, te_x, te_y = _reference_data(tmp_path)
    # k=1: the weighting cannot matter, so plain 1-NN on cosine distance is the reference.
    ref = KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(tr_x, tr_y).score(te_x, te_y)
    assert result["accuracy"]["1"]["top1"] == pytest.approx(ref)
    assert result["accuracy"]["5"]["top1"] > 0.9
    assert (tmp_path / "out" / "knn.config.yaml").exists()


def test_run_linear_is_accurate_like_sklearn(sources):
    cfg, tmp_path = sources
    result = json.loads(run_linear(cfg).read_text())
    tr_x, tr_y, te_x, te_y = _reference_data(tmp_path)
    ref = LogisticRegression(max_iter=1000).fit(tr_x, tr_y).score(te_x, te_y)
    assert result["accuracy"]["top1"] >= ref - 0.05
    assert len(result["val_accuracy"]) == len(cfg.eval.linear.lrs) * len(cfg.eval.linear.weight_decays)


def test_run_viz_writes_pngs_for_each_image(sources):
    cfg, tmp_path = sources
    cfg = OmegaConf.merge(
        cfg,
        OmegaConf.from_dotlist(
            [
                f"viz.images=[{tmp_path / 'train' / 'red'}]",
                f"viz.output_dir={tmp_path / 'viz'}",
                "viz.device=cpu",
            ]
        ),
    )
    out = run_viz(cfg)
    pngs = sorted(p.name for p in out.iterdir())
    assert len(pngs) == 12 * 6  # input, 2 heads, mean, pca, pca mask
    with Image.open(out / "000_00_attn_head1.png") as im:
        assert im.size == (16, 16)


def test_cls_plus_mean_pooling_concatenates_the_mean_patch_token(sources):
    cfg, tmp_path = sources
    cfg.eval.pooling = "cls+mean"
    result = json.loads(run_knn(cfg).read_text())
    assert result["feature_dim"] == 6 and result["pooling"] == "cls+mean"


def test_features_are_cached_between_protocols_and_refreshed_when_a_source_changes(sources, monkeypatch):
    cfg, tmp_path = sources
    calls = []
    monkeypatch.setattr(
        "lvd.pretrain.eval.stage.load_model", lambda *a, **k: calls.append(1) or (MeanColourViT(), PREP)
    )
    knn = json.loads(run_knn(cfg).read_text())
    linear = json.loads(run_linear(cfg).read_text())
    assert len(calls) == 1 and knn["feature_cache"] == linear["feature_cache"]
    assert Path(knn["feature_cache"]).exists()
    (tmp_path / "train" / "blue" / "99.png").write_bytes(_png(COLOURS["blue"], np.random.default_rng(1)))
    again = json.loads(run_knn(cfg).read_text())
    assert len(calls) == 2 and again["n_train"] == knn["n_train"] + 1
    cfg.eval.cache_features = False
    run_knn(cfg)
    assert len(calls) == 3
