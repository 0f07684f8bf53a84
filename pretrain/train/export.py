"""`python -m lvd.pretrain.train.export CHECKPOINT OUT.pth`: the teacher backbone as a hub-layout .pth.

The output loads with `build_backbone(ARCH, weights=OUT.pth)` and so with `lvd embed`.
"""

from __future__ import annotations

import argparse

from lvd.pretrain.train.checkpoint import export_teacher, load_checkpoint


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint", help="an lvd-pretrain checkpoint (RUN/pretrain/checkpoints/iter-*.pth)")
    ap.add_argument("out", help="where to write the teacher backbone state_dict")
    args = ap.parse_args(argv)
    arch = load_checkpoint(args.checkpoint)["arch"]
    path = export_teacher(args.checkpoint, args.out)
    print(f"{path}: teacher backbone of {arch['name']} (overrides {arch['overrides']})")


if __name__ == "__main__":
    main()
