"""`lvd detect`: the detect stage on a run (`lvd detect CONFIG`), or the boxes of one image.

    lvd detect --image x.jpg --prompt "a cat . a dog ." --weights DIR --out boxes.png [--json boxes.json]

draws the boxes into a PNG (and writes them as a JSON list of {"box": [x0, y0, x1, y1] in
pixels, "score", "phrase"}), as Grounding DINO's own demo does.
"""

from __future__ import annotations

import json
from pathlib import Path

from lvd.common.errors import InputFormatError, UserError

HELP = "boxes of a text prompt in every pool image (Grounding DINO), or in one image with --image"


def add_parser(sub, formatter) -> None:
    parser = sub.add_parser("detect", help=HELP, formatter_class=formatter)
    parser.add_argument(
        "config", metavar="CONFIG", nargs="?", default=None, help="YAML config file or packaged config name"
    )
    parser.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help="dotted overrides")
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    one = parser.add_argument_group("one image (instead of CONFIG)")
    one.add_argument("--image", default=None, help="the image file to detect in")
    one.add_argument("--prompt", default=None, help="phrases separated by ' . ', e.g. 'a cat . a dog .'")
    one.add_argument("--weights", default=None, help="local Hugging Face Grounding DINO folder")
    one.add_argument("--box-threshold", type=float, default=0.35, help="keep boxes scoring above this")
    one.add_argument("--text-threshold", type=float, default=0.25, help="phrase tokens scoring above this")
    one.add_argument(
        "--size", type=int, default=None, help="shorter side fed to the model; unset: the folder's setting"
    )
    one.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    one.add_argument("--out", default=None, help="PNG with the boxes drawn")
    one.add_argument("--json", default=None, help="the boxes as a JSON list")
    parser.set_defaults(func=cmd_detect)


def cmd_detect(args) -> int:
    if args.image is None:
        if args.config is None:
            raise UserError("lvd detect needs a CONFIG (the detect stage of a run) or --image FILE (one image)")
        stray = [f for f, v in (("--prompt", args.prompt), ("--weights", args.weights), ("--out", args.out),
                                ("--json", args.json), ("--size", args.size)) if v is not None]  # fmt: skip
        if stray:
            raise UserError(
                f"{', '.join(stray)} go with --image; for a run set detect.prompt=..., detect.weights=... instead"
            )
        from lvd.curate.cli import cmd_stage

        args.stage = "detect"
        return cmd_stage(args)
    return detect_one(args)


def _check_one(args) -> None:
    if args.config is not None:
        raise UserError("give either a CONFIG or --image, not both")
    missing = [flag for flag, value in (("--prompt", args.prompt), ("--weights", args.weights)) if value is None]
    if args.out is None and args.json is None:
        missing.append("--out or --json")
    if missing:
        raise UserError(f"lvd detect --image also needs {' and '.join(missing)}")
    for flag, value in (("--box-threshold", args.box_threshold), ("--text-threshold", args.text_threshold)):
        if not 0.0 <= value <= 1.0:
            raise InputFormatError(f"{flag} must be between 0 and 1, got {value}")


def detect_one(args) -> int:
    """Detect in one image; the PNG and JSON are written atomically."""
    from lvd.common.atomic import atomic_path, atomic_write_json
    from lvd.common.errors import MissingInputError
    from lvd.curate.detect_draw import draw_boxes
    from lvd.pretrain.data.decode import decode
    from lvd.pretrain.models.grounding import GroundingDino, normalise_prompt

    _check_one(args)
    prompt = normalise_prompt(args.prompt)
    path = Path(args.image)
    if not path.is_file():
        raise MissingInputError(f"image not found: {path}")
    image = decode(path.read_bytes())
    model = GroundingDino(args.weights, device=args.device, size=args.size)
    (found,) = model.detect([image], prompt, args.box_threshold, args.text_threshold)
    boxes = [
        {"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "phrase": phrase}
        for box, score, phrase in zip(found.boxes, found.scores, found.phrases)
    ]
    if args.json is not None:
        atomic_write_json(args.json, boxes)
    if args.out is not None:
        with atomic_path(args.out) as tmp:
            draw_boxes(image, found.boxes, found.scores, found.phrases).save(tmp, format="PNG")
    print(json.dumps({"image": str(path), "boxes": len(boxes), "out": args.out, "json": args.json}))
    return 0
