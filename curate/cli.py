"""The `lvd` command line (the contract of docs/architecture.md and the README's command table).

Each pipeline stage is `curate.<stage>.run_<stage>(cfg) -> Path`; this module only parses
arguments, merges the config and dispatches. Stage modules are imported when a stage runs, so
`lvd --help` stays fast. Errors follow lvd's one policy (`lvd.common.errors.run_command`).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from lvd.common.errors import run_command
from lvd.common.logs import setup_logging
from lvd.curate.config import load_config
from lvd.curate.run import STAGES, run_stage  # noqa: F401 (the pipeline's order and runner, read here by the demo)

STAGE_HELP = {
    "manifest": "list every input, hash and decode it; quarantine what cannot be used",
    "embed": "embed the manifest's usable images with the configured backbone",
    "dedup": "exact and near-duplicate removal, and decontamination against eval sets",
    "cluster": "k-means of the deduplicated pool (flat or hierarchical)",
    "retrieve": "retrieve the pool neighbours of each curated seed set",
    "shards": "write the curated images as WebDataset tar shards with provenance",
    "report": "an HTML report with pictures of every stage's decisions",
}

EXIT_OK = 0

log = logging.getLogger("lvd")


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=32)


def _function(target: str) -> Callable:
    """The function `module:name`, imported only when its command runs."""
    module_name, func_name = target.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def _config_args(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument(
        "config",
        metavar="CONFIG",
        nargs=None if config_required else "?",
        help="YAML config file, or the name of a packaged one (default, demo, lvd142m)",
    )
    parser.add_argument(
        "overrides", metavar="KEY=VALUE", nargs="*", help="dotted overrides, e.g. embed.batch_size=32", default=[]
    )
    parser.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")


def _pipeline_config(args, defaults: str = "default"):
    overrides = list(args.overrides)
    if getattr(args, "overwrite", False):
        overrides.append("overwrite=true")
    cfg = load_config(args.config, overrides, defaults=defaults)
    setup_logging(cfg.get("log_level", "INFO"))
    return cfg


def cmd_stage(args) -> int:
    cfg = _pipeline_config(args)
    out = run_stage(args.stage, cfg)
    print(out)
    return EXIT_OK


def cmd_run(args) -> int:
    from lvd.curate.run import run_pipeline

    run_pipeline(_pipeline_config(args), args.until)
    return EXIT_OK


def cmd_submit(args) -> int:
    from lvd.curate.submit import submit

    submit(args)
    return EXIT_OK


def cmd_config(args) -> int:
    from omegaconf import OmegaConf

    cfg = load_config(args.config, args.overrides, defaults=args.schema)
    print(OmegaConf.to_yaml(cfg), end="")
    return EXIT_OK


def cmd_demo(args) -> int:
    func = _function("lvd.curate.demo.run:run_demo")
    setup_logging()
    return int(func(args) or EXIT_OK)


def cmd_pretrain(args) -> int:
    cfg = _pipeline_config(args, defaults="pretrain")
    out = _function("lvd.pretrain.train:run_pretrain")(cfg)
    print(out)
    return EXIT_OK


def cmd_eval(args) -> int:
    cfg = _pipeline_config(args, defaults="pretrain")
    target = {"knn": "lvd.pretrain.eval.knn:run_knn", "linear": "lvd.pretrain.eval.linear:run_linear"}[args.protocol]
    out = _function(target)(cfg)
    print(out)
    return EXIT_OK


def cmd_viz(args) -> int:
    cfg = _pipeline_config(args, defaults="pretrain")
    out = _function("lvd.pretrain.viz:run_viz")(cfg)
    print(out)
    return EXIT_OK


def _add_index(sub) -> None:
    parser = sub.add_parser(
        "index", help="nearest-neighbour image lookup: build, add, search, serve", formatter_class=_formatter
    )
    from lvd.serve.cli import add_subcommands

    add_subcommands(parser.add_subparsers(dest="index_command", metavar="COMMAND", required=True))


def _add_pipeline(sub) -> None:
    run = sub.add_parser("run", help="every stage in order, skipping finished ones", formatter_class=_formatter)
    _config_args(run)
    run.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    run.set_defaults(func=cmd_run)
    from lvd.curate.detect_cli import add_parser as add_detect

    add_detect(sub, _formatter)  # optional, before embed: a stage, or one image (`lvd detect --image`)
    for name in STAGES:
        stage = sub.add_parser(name, help=STAGE_HELP[name], formatter_class=_formatter)
        _config_args(stage)
        stage.set_defaults(func=cmd_stage, stage=name)

    submit = sub.add_parser(
        "submit",
        help="run the pipeline (or pretrain) on a Slurm cluster through submitit, every task a torch.distributed rank",
        formatter_class=_formatter,
    )
    _config_args(submit)
    from lvd.curate.submit import add_arguments

    add_arguments(submit)
    submit.set_defaults(func=cmd_submit)


def _add_demo(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="the whole chain on offline demo data (Fashion-MNIST, Debian photos, a long-tailed pool), then a short "
        "pretrain in two phases, a distillation and an attention video",
        formatter_class=_formatter,
    )
    demo.add_argument("--out", default="demo-run", help="run folder for the demo")
    demo.add_argument("--pool-size", type=int, default=4000, help="Fashion-MNIST train images in the pool")
    demo.add_argument("--eval-size", type=int, default=500, help="Fashion-MNIST test images in the eval set")
    demo.add_argument("--seed", type=int, default=0, help="seed for the planted duplicates and sampling")
    demo.add_argument(
        "--fmnist", default="/usr/share/datasets/fashion-mnist", help="folder with the Fashion-MNIST IDX files"
    )
    demo.add_argument("--no-pretrain", action="store_true", help="skip the short pretraining on the curated shards")
    demo.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help="config overrides")
    demo.set_defaults(func=cmd_demo)


def _add_training(sub) -> None:
    pretrain = sub.add_parser(
        "pretrain",
        help="DINOv2 / DINO pretraining on WebDataset shards, in phases; mode=distill",
        formatter_class=_formatter,
    )
    _config_args(pretrain)
    pretrain.set_defaults(func=cmd_pretrain)
    evaluate = sub.add_parser("eval", help="evaluate a backbone on labelled images", formatter_class=_formatter)
    eval_sub = evaluate.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    for protocol, text in (
        ("knn", "weighted k-NN on frozen features"),
        ("linear", "linear classifier on frozen features"),
    ):
        p = eval_sub.add_parser(protocol, help=text, formatter_class=_formatter)
        _config_args(p)
        p.set_defaults(func=cmd_eval)
    viz = sub.add_parser(
        "viz", help="attention maps and patch-feature PCA as PNG images; attention videos", formatter_class=_formatter
    )
    _config_args(viz)
    viz.set_defaults(func=cmd_viz)


def _add_config(sub) -> None:
    config = sub.add_parser(
        "config", help="print the merged config (defaults, file, overrides)", formatter_class=_formatter
    )
    config.add_argument(
        "config", metavar="CONFIG", nargs="?", default=None, help="YAML config file or packaged config name"
    )
    config.add_argument("overrides", metavar="KEY=VALUE", nargs="*", default=[], help="dotted overrides")
    config.add_argument(
        "--schema", choices=("default", "pretrain"), default="default", help="which defaults to merge over"
    )
    config.set_defaults(func=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lvd",
        description="Curate image datasets the way DINOv2 built LVD-142M, look up similar images, "
        "and pretrain DINO-family models on the result.",
        formatter_class=_formatter,
    )
    from importlib.metadata import PackageNotFoundError, version

    try:
        parser.add_argument("--version", action="version", version=f"lvd {version('lvd')}")
    except PackageNotFoundError:
        pass
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_pipeline(sub)
    _add_demo(sub)
    _add_index(sub)
    _add_training(sub)
    _add_config(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Every command's errors take one path: a user error is one line on stderr and exit 2, anything
    else is lvd's bug (its traceback, and a request to report it)."""
    args = build_parser().parse_args(argv)
    return run_command("lvd", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
