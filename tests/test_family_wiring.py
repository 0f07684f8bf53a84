"""Every place lvd uses a backbone, with the DINO v1 / DINOv3 ViTs and the ConvNets: the embed
stage (a transformers folder under `model: auto`, checked against transformers itself; two
torchrun ranks), search by image in an index, k-NN evaluation, and the pictures of `lvd viz`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from index_support import embedded_photo_run
from omegaconf import OmegaConf
from parity_support import randomise
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier
from test_embed import _cfg, _paths, _reference_square, _write_images

from lvd.common.run_folder import load_embeddings
from lvd.curate.embed import run_embed
from lvd.curate.manifest import read_manifest, run_manifest
from lvd.index.store import BuildOptions, IndexStore
from lvd.pretrain.eval import run_knn
from lvd.pretrain.models import build_backbone
from lvd.pretrain.train.checkpoint import export_backbone
from lvd.pretrain.viz import cls_attention, run_viz
from lvd.serve.query_embedding import embed_query_bytes, index_embedder
from lvd.serve.run_inputs import build

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "pretrain.yaml"
MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _dinov3_folder(folder: Path) -> transformers.DINOv3ViTModel:
    cfg = transformers.DINOv3ViTConfig(
        hidden_size=32,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        patch_size=4,
        image_size=32,
        num_register_tokens=4,
    )
    torch.manual_seed(0)
    hf = randomise(transformers.DINOv3ViTModel(cfg))
    hf.save_pretrained(folder)
    return hf


def test_embed_stage_reads_a_dinov3_transformers_folder_with_model_auto(tmp_path):
    hf = _dinov3_folder(tmp_path / "hf")
    _write_images(tmp_path / "pool", 6)
    cfg = _cfg(
        tmp_path / "run",
        tmp_path / "pool",
        f"embed.weights={tmp_path / 'hf'}",
        "embed.model=auto",
        "embed.dtype=float32",
        "embed.batch_size=4",
    )
    run_manifest(cfg)
    out = run_embed(cfg)
    ids, x = load_embeddings(out)
    frame = read_manifest(cfg.run_dir, status="ok")
    paths = _paths(frame)
    squares = np.stack([(_reference_square(paths[i], 32) - MEAN) / STD for i in ids.tolist()]).transpose(0, 3, 1, 2)
    with torch.no_grad():  # transformers' own CLS token, L2-normalised
        ref = hf(pixel_values=torch.from_numpy(squares.astype(np.float32))).pooler_output.numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(x, ref, atol=2e-3)  # float16 storage
    success = json.loads((out / "_SUCCESS.json").read_text())
    assert success["model"] == "dinov3_vit_tiny_p4" and success["dim"] == 32 and success["resolution"] == 32


@pytest.mark.slow
def test_two_torchrun_ranks_embed_a_convnext_as_one(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "convnext.pth"
    torch.save(randomise(build_backbone("dinov3_convnext_mini")).state_dict(), weights)
    _write_images(tmp_path / "pool", 7)
    extra = (f"embed.weights={weights}", "embed.model=dinov3_convnext_mini", "embed.part_size=2")
    extra += ("embed.batch_size=2", "embed.dtype=float32", "embed.device=cpu")
    one = _cfg(tmp_path / "one", tmp_path / "pool", *extra)
    run_manifest(one)
    run_embed(one)
    two = _cfg(tmp_path / "two", tmp_path / "pool", *extra)
    run_manifest(two)
    OmegaConf.save(two, tmp_path / "two.yaml")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "lvd.curate.embed", str(tmp_path / "two.yaml")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    files = lambda run: {p.name: p.read_bytes() for p in sorted((run / "embed").glob("*.npy"))}  # noqa: E731
    assert len(files(tmp_path / "one")) == 8 and files(tmp_path / "two") == files(tmp_path / "one")


@pytest.mark.parametrize("model", ["dinov3_convnext_mini", "dino_vit_tiny_p4"])
def test_an_index_finds_its_own_images_through_the_same_backbone(tmp_path, model):
    rows, data, x = embedded_photo_run(tmp_path / "run", model=model)
    build(tmp_path / "run" / "embed", tmp_path / "index", BuildOptions(factory="Flat", progress=False))
    store = IndexStore.open(tmp_path / "index")
    embedder = index_embedder(store)
    assert embedder.name == model
    ids = [r["id"] for r in rows[:4]]
    queries = embed_query_bytes(embedder, [data[i] for i in ids])
    np.testing.assert_allclose(queries, x[:4], atol=1e-5)  # the query path embeds as the stage did
    scores, found = store.search(queries, k=1)
    assert [store.results(scores, found)[i][0]["id"] for i in range(4)] == ids


def _class_images(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        arr = rng.integers(0, 120, (64, 64, 3), dtype=np.uint8)
        arr[:, 20 * (i % 3) : 20 * (i % 3) + 16] = 230
        out.append(arr)
    return out


def test_knn_evaluation_of_an_exported_resnet_with_model_auto(tmp_path):
    torch.manual_seed(1)
    model = randomise(build_backbone("dino_resnet_mini"), scale=0.05)
    weights = export_backbone(model.state_dict(), tmp_path / "resnet.safetensors", "dino_resnet_mini", {})
    train, test = _class_images(18, 0), _class_images(9, 1)
    for split, arrays in (("train", train), ("test", test)):
        for i, arr in enumerate(arrays):
            (tmp_path / split / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(tmp_path / split / f"c{i % 3}" / f"{i:02d}.png")
    dotlist = [f"eval.weights={weights}", f"eval.train={tmp_path / 'train'}", f"eval.test={tmp_path / 'test'}"]
    dotlist += [f"run_dir={tmp_path}", "eval.model=auto", "eval.overrides={}", "eval.device=cpu"]
    dotlist += ["eval.dtype=float32", "eval.knn.ks=[1]"]
    cfg = OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(dotlist))
    result = json.loads(run_knn(cfg).read_text())
    assert result["feature_dim"] == 256

    def pooled(arrays):  # 64 px images at a 64 px model: no resize, only normalisation
        x = torch.tensor(np.stack([(a / 255.0 - MEAN) / STD for a in arrays]), dtype=torch.float32)
        with torch.no_grad():
            return model.eval()(x.permute(0, 3, 1, 2)).numpy()

    def order(arrays):  # class folders sorted, then file names
        return [arrays[i] for c in range(3) for i in range(len(arrays)) if i % 3 == c]

    y = lambda n: np.array([c for c in range(3) for i in range(n) if i % 3 == c])  # noqa: E731
    ref = KNeighborsClassifier(1, metric="cosine", algorithm="brute").fit(pooled(order(train)), y(18))
    assert result["accuracy"]["1"]["top1"] == pytest.approx(ref.score(pooled(order(test)), y(9)))


def test_viz_attention_of_a_dinov3_vit_leaves_the_storage_tokens_out(tmp_path):
    hf = _dinov3_folder(tmp_path / "hf")
    hf.set_attn_implementation("eager")
    model = build_backbone("auto", tmp_path / "hf").eval()
    x = torch.randn(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(pixel_values=x, output_attentions=True).attentions[-1]
    maps = cls_attention(model, x)  # 1 x heads x 8 x 12: CLS to the 96 patches, not to the 4 storage tokens
    assert maps.shape == (1, 2, 8, 12)
    np.testing.assert_allclose(maps, ref[:, :, 0, 5:].reshape(1, 2, 8, 12).numpy(), rtol=1e-4, atol=1e-6)
    (tmp_path / "imgs").mkdir()
    Image.fromarray(_class_images(1, 0)[0]).save(tmp_path / "imgs" / "a.png")
    dotlist = [f"run_dir={tmp_path}", "model.arch=dinov3_vit_tiny_p4", f"viz.weights={tmp_path / 'hf'}"]
    dotlist += [f"viz.images=[{tmp_path / 'imgs'}]", "viz.device=cpu"]
    out = run_viz(OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(dotlist)))
    expected = ["input", "attn_head0", "attn_head1", "attn_mean", "pca", "pca_mask"]
    assert sorted(p.name for p in out.iterdir()) == sorted(f"000_a_{k}.png" for k in expected)


def test_viz_of_a_convnet_draws_the_pca_and_says_there_is_no_attention(tmp_path, caplog):
    (tmp_path / "imgs").mkdir()
    for i, arr in enumerate(_class_images(2, 0)):
        Image.fromarray(arr).save(tmp_path / "imgs" / f"{i}.png")
    dotlist = [f"run_dir={tmp_path}", "model.arch=dinov3_convnext_mini", "viz.weights=null"]
    dotlist += [f"viz.images=[{tmp_path / 'imgs'}]", "viz.device=cpu"]
    with caplog.at_level("WARNING"):
        out = run_viz(OmegaConf.merge(OmegaConf.load(CONFIG), OmegaConf.from_dotlist(dotlist)))
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["NO_ATTENTION.txt"] + [f"00{i}_{i}_{k}.png" for i in (0, 1) for k in ("input", "pca", "pca_mask")]
    )
    note = (out / "NO_ATTENTION.txt").read_text()
    assert "ConvNet" in note and "no self-attention" in note and "no self-attention" in caplog.text
    with Image.open(out / "000_0_pca.png") as im:
        assert im.size == (64, 64)  # 2 x 2 cells of 32 px
