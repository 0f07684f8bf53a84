"""`lvd index build | add | search | serve`: argparse sub-commands over an index folder.

`curate/cli.py` calls `add_subcommands(subparsers)` under its `index` command; each
sub-command sets `func(args) -> int` (the exit status). `main(argv)` runs the same commands
on their own (`python -m lvd.serve.cli build ...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from lvd.common.errors import InputFormatError, run_command
from lvd.common.logs import setup_logging

log = logging.getLogger(__name__)


def add_subcommands(subparsers) -> None:
    """Add build, add, search and serve to an argparse sub-parsers object."""
    fmt = argparse.ArgumentDefaultsHelpFormatter

    p = subparsers.add_parser(
        "build",
        formatter_class=fmt,
        help="build an index over an embed folder",
        description="Build a nearest-neighbour index over every part of an embed folder.",
    )
    p.add_argument("embed_dir", type=Path, metavar="EMBED_DIR", help="RUN/embed (part-*.npy, ids-*.npy)")
    p.add_argument("--out", type=Path, required=True, metavar="INDEX_DIR", help="folder to write the index to")
    p.add_argument(
        "--factory",
        default="auto",
        help="auto (choose from size, dimension and memory budget) or a Faiss factory string",
    )
    _add_tuning_args(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing index in INDEX_DIR")
    p.set_defaults(func=_cmd_build)

    p = subparsers.add_parser(
        "add",
        formatter_class=fmt,
        help="add new embed parts to an index",
        description="Add the parts of EMBED_DIR that the index does not hold yet (no retraining).",
    )
    p.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    p.add_argument("embed_dir", type=Path, metavar="EMBED_DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_add)

    p = subparsers.add_parser(
        "search",
        formatter_class=fmt,
        help="search an index from the shell",
        description="Nearest neighbours of images, vectors or indexed ids.",
    )
    p.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", type=Path, nargs="+", metavar="FILE", help="query image files")
    q.add_argument("--vector", type=Path, metavar="NPY", help=".npy of one vector (D,) or several (Q, D)")
    q.add_argument("--id", type=int, nargs="+", metavar="ID", help="manifest ids of indexed images")
    p.add_argument("-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--json", action="store_true", help="JSON output for programs instead of a table")
    p.add_argument("--device", default="cpu", help="torch device for embedding query images")
    p.set_defaults(func=_cmd_search)

    p = subparsers.add_parser(
        "serve",
        formatter_class=fmt,
        help="HTTP API and web page",
        description="Serve indexes over HTTP (uvicorn): lvd's JSON API, clip-retrieval's "
        "/knn-service, /metadata and /indices-list, /metrics, and a drop-an-image page.",
    )
    p.add_argument(
        "index_dir",
        nargs="*",
        metavar="[NAME=]INDEX_DIR",
        help="index folders to serve, each named NAME (default: the folder's name); the first is the default",
    )
    p.add_argument(
        "--indices",
        type=Path,
        metavar="FILE",
        help="YAML/JSON mapping NAME to {path, device, dtype}: indexes with their own embedder settings",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; each maps the indexes read-only, so the vectors are shared",
    )
    p.add_argument("--max-upload", default="20M", help="largest accepted request body")
    p.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    p.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="query images embedded (and thumbnails made) at once, per worker; concurrent searches "
        "by vector or id share Faiss calls",
    )
    p.add_argument("--max-connections", type=int, default=2048, help="open connections; more are answered 503")
    p.add_argument("--device", default="cpu", help="torch device for embedding uploaded images")
    p.add_argument(
        "--expose-paths",
        action="store_true",
        help="let responses carry the images' absolute paths (a trusted network only)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN (e.g. a clip-retrieval front end) to call the API",
    )
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send request headers")
    p.add_argument("--body-timeout", type=float, default=20.0, help="seconds a client has to send a request body")
    p.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")
    p.add_argument("--no-access-log", action="store_true", help="do not print one JSON line per request on stderr")
    p.set_defaults(func=_cmd_serve)


def _add_tuning_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--memory-gb",
        default="auto",
        help="GiB the index may use when --factory is auto; auto = a third of this machine's memory (as memory_gb)",
    )
    p.add_argument("--target-recall", type=float, default=0.95, help="recall@k the search parameter is tuned to reach")
    p.add_argument("-k", type=int, default=10, help="k of the recall target")
    p.add_argument(
        "--calibration-queries",
        type=int,
        default=1000,
        help="indexed vectors used as queries when tuning and measuring recall",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda: where Faiss trains (GPU Faiss only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _cmd_build(args) -> int:
    from lvd.index.store import BuildOptions
    from lvd.serve.run_inputs import build

    opts = BuildOptions(
        factory=args.factory,
        memory_gb=args.memory_gb,
        target_recall=args.target_recall,
        k=args.k,
        calibration_queries=args.calibration_queries,
        device=args.device,
        seed=args.seed,
        progress=False if args.no_progress else None,
    )
    info = build(args.embed_dir, args.out, opts, overwrite=args.overwrite)
    _print_summary(info, args.out)
    return 0


def _cmd_add(args) -> int:
    from lvd.index.store import BuildOptions
    from lvd.serve.run_inputs import add

    info = add(args.index_dir, args.embed_dir, BuildOptions(progress=False if args.no_progress else None))
    _print_summary(info, args.index_dir)
    return 0


def _print_summary(info: dict, out: Path) -> None:
    rec = info["expected_recall"]
    print(f"index: {out}  ({info['n']} vectors x {info['dim']})")
    print(f"  chosen: {info['factory']}  because {info['plan']['reason']}")
    if rec["recall"] is None:
        measured = "not measured (too few vectors)"
    elif rec.get("how") == "exact":
        measured = "1.000 (exact search)"
    else:
        measured = (
            f"{rec['recall']:.3f} (measured on {rec['queries']} held-out indexed vectors, target {rec['target']})"
        )
    print(f"  search: {info['search_params'] or 'exhaustive'}  expected recall@{rec['k']} = {measured}")


def _cmd_search(args) -> int:
    from lvd.index.store import IndexStore

    store = IndexStore.open(args.index_dir)
    if args.k < 1:
        raise InputFormatError("-k must be at least 1")
    if args.vector is not None:
        xq = np.load(args.vector, allow_pickle=False)
        xq = np.atleast_2d(xq).astype(np.float32)
        names = [f"{args.vector.name}[{i}]" for i in range(len(xq))]
    elif args.id is not None:
        missing = [i for i in args.id if not _has(store, i)]
        if missing:
            raise InputFormatError(f"ids not in the index: {missing}")
        xq = np.stack([store.vector_of(i) for i in args.id])
        names = [f"id {i}" for i in args.id]
    else:
        from lvd.pretrain.data.decode import DecodeError
        from lvd.serve.query_embedding import embed_query_bytes, index_embedder

        embedder = index_embedder(store, args.device)
        xq = []
        for path in args.image:
            try:
                xq.append(embed_query_bytes(embedder, [path.read_bytes()])[0])
            except DecodeError as exc:
                raise InputFormatError(f"{path}: {exc}") from None
        xq = np.stack(xq)
        names = [str(p) for p in args.image]
    scores, rows = store.search(xq, args.k)
    results = store.results(scores, rows)
    if args.json:
        json.dump([{"query": n, "results": r} for n, r in zip(names, results)], sys.stdout, indent=1)
        print()
    else:
        for name, hits in zip(names, results):
            print(format_table(name, hits))
    return 0


def _has(store, id_: int) -> bool:
    try:
        store.row_of(id_)
        return True
    except KeyError:
        return False


def format_table(name: str, hits: list[dict]) -> str:
    """Results of one query as an aligned text table."""
    lines = [f"query: {name}", f"{'rank':>4}  {'score':>7}  {'id':>20}  {'set':<14} location"]
    for h in hits:
        where = (
            f"{h['source']}::{h['key']}"
            if h.get("kind") == "tar"
            else (str(Path(h["source"]) / h["key"]) if h.get("source") and h.get("key") else "-")
        )
        lines.append(f"{h['rank']:>4}  {h['score']:>7.4f}  {h['id']:>20}  {h.get('set') or '-':<14} {where}")
    return "\n".join(lines) + "\n"


def _cmd_serve(args) -> int:
    from lvd.index.ann import parse_bytes
    from lvd.serve.server import bind, serve
    from lvd.serve.service import ServeOptions

    specs = index_specs(args.index_dir, args.indices)
    if args.workers < 1:
        raise InputFormatError("--workers must be at least 1")
    opts = ServeOptions(
        max_upload_bytes=parse_bytes(args.max_upload),
        max_k=args.max_k,
        max_concurrent_searches=args.concurrency,
        max_connections=args.max_connections,
        device=args.device,
        expose_paths=args.expose_paths,
        cors_origins=tuple(args.cors_origin),
        header_timeout=args.header_timeout,
        body_timeout=args.body_timeout,
        keep_alive_timeout=args.keep_alive,
        access_log=not args.no_access_log,
    )
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening on %s: anyone who can reach this address can search the index and see its images", args.host
        )
    names = ", ".join(s.name for s in specs)
    print(f"serving {names} on http://{host}:{port}/  ({args.workers} worker(s); Ctrl-C to stop)", flush=True)
    try:
        serve(specs, opts, sock, workers=args.workers)
    finally:
        sock.close()
    return 0


def index_specs(dirs: list[str], indices_file: Path | None) -> list:
    """The indexes to serve from `[NAME=]DIR` arguments and an --indices file, in that order."""
    from lvd.serve.service import IndexSpec

    specs = []
    for arg in dirs:
        name, sep, path = arg.partition("=")
        name, path = (name, path) if sep else (Path(arg).resolve().name, arg)
        specs.append(IndexSpec(name, Path(path)))
    if indices_file is not None:
        import yaml

        table = yaml.safe_load(Path(indices_file).read_text())
        if not isinstance(table, dict):
            raise InputFormatError(f"{indices_file}: expected a mapping NAME: {{path: ..., device: ..., dtype: ...}}")
        for name, entry in table.items():
            entry = {"path": entry} if isinstance(entry, str) else entry
            if not isinstance(entry, dict) or "path" not in entry:
                raise InputFormatError(f"{indices_file}: index {name!r} needs a path")
            unknown = set(entry) - {"path", "device", "dtype"}
            if unknown:
                raise InputFormatError(f"{indices_file}: index {name!r} has unknown keys {sorted(unknown)}")
            specs.append(IndexSpec(str(name), Path(entry["path"]), entry.get("device"), entry.get("dtype")))
    if not specs:
        raise InputFormatError("give at least one INDEX_DIR or --indices FILE")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputFormatError(f"index names repeat: {names}; name them with NAME=INDEX_DIR")
    return specs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="lvd index", description="Nearest-neighbour image lookup.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    setup_logging("INFO")
    return run_command("lvd index", lambda: args.func(args), debug=args.debug)


if __name__ == "__main__":
    raise SystemExit(main())
