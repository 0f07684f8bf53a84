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

from lvd.common.errors import InputFormatError, MissingInputError, run_command
from lvd.common.logs import setup_logging
from lvd.serve.access import KEY_ENV

log = logging.getLogger(__name__)


def add_subcommands(subparsers) -> None:
    """Add build, add, search and serve to an argparse sub-parsers object."""
    for add in (_add_build, _add_add, _add_search, _add_serve):
        add(subparsers)


def _add_build(subparsers) -> None:
    p = subparsers.add_parser(
        "build",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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


def _add_add(subparsers) -> None:
    p = subparsers.add_parser(
        "add",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="add new embed parts to an index",
        description="Add the parts of EMBED_DIR that the index does not hold yet (no retraining).",
    )
    p.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    p.add_argument("embed_dir", type=Path, metavar="EMBED_DIR")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=_cmd_add)


def _add_search(subparsers) -> None:
    p = subparsers.add_parser(
        "search",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="search an index from the shell",
        description="Nearest neighbours of images, vectors or indexed ids.",
    )
    p.add_argument("index_dir", type=Path, metavar="INDEX_DIR")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--image", type=Path, nargs="+", metavar="FILE", help="query image files")
    q.add_argument("--vector", type=Path, metavar="NPY", help=".npy of one vector (D,) or several (Q, D)")
    q.add_argument("--id", type=int, nargs="+", metavar="ID", help="manifest ids of indexed images")
    q.add_argument(
        "--text", nargs="+", metavar="TEXT", help="query texts (indexes embedded with a CLIP or SigLIP model)"
    )
    q.add_argument(
        "--query",
        metavar="QUERY",
        help="a weighted sum of parts, normalised: '+0.7 image:a.jpg +0.3 text:snow -0.2 text:people' "
        "(parts: image:FILE, text:TEXT, vector:NPY, id:ID)",
    )
    p.add_argument("-k", type=int, default=10, help="neighbours per query")
    p.add_argument("--json", action="store_true", help="JSON output for programs instead of a table")
    p.add_argument(
        "--out",
        type=Path,
        metavar="FILE.parquet|FOLDER",
        help="also write the results: a .parquet table (query, rank, id, score, key, set, label, cluster), or "
        "a new folder of WebDataset shards of the images with their provenance (a source for lvd run)",
    )
    p.add_argument(
        "--return-embeddings", action="store_true", help="results carry their stored vectors (--json, .parquet)"
    )
    p.add_argument("--device", default="cpu", help="torch device for embedding query images and texts")
    p.set_defaults(func=_cmd_search)


def _add_serve(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind; any other than loopback (0.0.0.0 exposes it to the network) needs --api-key, "
        "or --insecure-public",
    )
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="server processes; each maps the indexes read-only, so the vectors are shared",
    )
    p.add_argument("--device", default="cpu", help="torch device for embedding uploaded images")
    p.add_argument("--no-access-log", action="store_true", help="do not print one JSON line per request on stderr")
    _add_serve_limits(p.add_argument_group("limits"))
    _add_serve_access(p.add_argument_group("access"))
    p.set_defaults(func=_cmd_serve)


def _add_serve_limits(g) -> None:
    """What one request or client may take: sizes, concurrency, memory, time."""
    g.add_argument("--max-upload", default="20M", help="largest accepted request body")
    g.add_argument("--max-k", type=int, default=100, help="largest k a request may ask for")
    g.add_argument(
        "--concurrency",
        type=int,
        default=4,
        help="query images embedded (and thumbnails made) at once, per worker; concurrent searches "
        "by vector or id share Faiss calls",
    )
    g.add_argument("--max-connections", type=int, default=2048, help="open connections; more are answered 503")
    g.add_argument(
        "--decode-memory",
        default="1G",
        help="memory that images being decoded (uploads, thumbnails) may hold at once; larger ones wait their turn",
    )
    g.add_argument("--header-timeout", type=float, default=10.0, help="seconds a client has to send request headers")
    g.add_argument("--body-timeout", type=float, default=20.0, help="seconds a client has to send a request body")
    g.add_argument("--keep-alive", type=float, default=5.0, help="seconds an idle keep-alive connection stays open")


def _add_serve_access(g) -> None:
    """Who may call the server and what its answers reveal."""
    g.add_argument(
        "--expose-paths",
        action="store_true",
        help="let responses carry the images' absolute paths (a trusted network only)",
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="allow browser pages from ORIGIN (e.g. a clip-retrieval front end) to call the API",
    )
    g.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help=f"every route but /api/health needs this key (header X-API-Key, ?key=, or the path prefix /key/KEY/); "
        f"default: ${KEY_ENV}. Image URLs in answers are signed and expire instead",
    )
    g.add_argument(
        "--insecure-public",
        action="store_true",
        help="serve on a non-loopback address without an API key (anyone who reaches it sees the images)",
    )
    g.add_argument(
        "--public-url",
        default=None,
        metavar="URL",
        help="the server's address as browsers reach it (behind a proxy), for the image URLs in answers; "
        "default: the address each request was sent to",
    )
    g.add_argument("--url-ttl", type=float, default=3600.0, help="seconds a signed image URL stays valid (with a key)")


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
    xq, names = _query_vectors(store, args)
    scores, rows = store.search(xq, args.k)
    results = store.results(scores, rows)
    if args.return_embeddings:
        for hits, rrow in zip(results, rows):
            for hit, row in zip(hits, (r for r in rrow if r >= 0)):
                hit["embedding"] = store.index.reconstruct(int(row)).astype(float).tolist()
    if args.json:
        json.dump([{"query": n, "results": r} for n, r in zip(names, results)], sys.stdout, indent=1)
        print()
    else:
        for name, hits in zip(names, results):
            print(format_table(name, hits))
    if args.out is not None:
        _write_results(store, names, scores, rows, args)
    return 0


def _query_vectors(store, args) -> tuple[np.ndarray, list[str]]:
    """The queries of `lvd index search` as float32 rows, with a name for each."""
    if args.vector is not None:
        xq = np.load(args.vector, allow_pickle=False)
        xq = np.atleast_2d(xq).astype(np.float32)
        return xq, [f"{args.vector.name}[{i}]" for i in range(len(xq))]
    if args.id is not None:
        missing = [i for i in args.id if not _has(store, i)]
        if missing:
            raise InputFormatError(f"ids not in the index: {missing}")
        return np.stack([store.vector_of(i) for i in args.id]), [f"id {i}" for i in args.id]
    if args.image is not None:
        from lvd.pretrain.data.decode import DecodeError
        from lvd.serve.query_embedding import embed_query_bytes, index_embedder

        embedder = index_embedder(store, args.device)
        xq = []
        for path in args.image:
            try:
                xq.append(embed_query_bytes(embedder, [_read(path)])[0])
            except DecodeError as exc:
                raise InputFormatError(f"{path}: {exc}") from None
        return np.stack(xq), [str(p) for p in args.image]
    svc = _service(store, args.device)
    if args.text is not None:
        return _served(svc.text_vectors, args.text), [f"text: {t}" for t in args.text]
    return _served(svc.mixed_vector, _query_parts(args.query)), [args.query]


def _service(store, device: str):
    from lvd.serve.service import IndexService, ServeOptions

    return IndexService(store.path.name, store, ServeOptions(device=device, expose_paths=True))


def _served(fn, arg):
    """A service call from the shell: its refusals are the user's to fix."""
    from lvd.serve.service import ServiceError

    try:
        return fn(arg)
    except ServiceError as exc:
        raise InputFormatError(exc.message) from None


def _query_parts(text: str) -> list:
    """--query's parts with their files read: image parts as bytes, vector parts as arrays."""
    from dataclasses import replace

    from lvd.serve.query_mix import parse_query

    parts = []
    for part in parse_query(text):
        if part.kind == "image":
            part = replace(part, value=_read(Path(part.value)))
        elif part.kind == "embedding":
            path = Path(part.value)
            try:
                part = replace(part, value=np.load(path, allow_pickle=False).astype(np.float64).reshape(-1).tolist())
            except (OSError, ValueError) as exc:
                raise InputFormatError(f"{path}: not a readable .npy vector ({exc})") from None
        parts.append(part)
    return parts


def _read(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise MissingInputError(f"query image not found: {path}") from None
    except IsADirectoryError:
        raise InputFormatError(f"{path} is a folder, not an image file") from None


def _write_results(store, names, scores, rows, args) -> None:
    from lvd.serve.result_export import results_table, write_parquet, write_shards
    from lvd.serve.run_inputs import load_annotations

    table = results_table(store, names, scores, rows, load_annotations(store), embeddings=args.return_embeddings)
    if args.out.suffix.lower() == ".parquet":
        write_parquet(table, args.out)
        print(f"wrote {len(table)} results to {args.out}", file=sys.stderr)
        return
    shards = write_shards(table, store, args.out)
    spec = f"{args.out}/results-{{000000..{len(shards) - 1:06d}}}.tar"
    print(
        f"wrote {table['id'].nunique()} images in {len(shards)} shard(s) to {args.out}/ (a source: {spec})",
        file=sys.stderr,
    )


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
    import os

    from lvd.index.ann import parse_bytes
    from lvd.serve.server import bind, open_catalog, serve
    from lvd.serve.service import ServeOptions

    specs = index_specs(args.index_dir, args.indices)
    if args.workers < 1:
        raise InputFormatError("--workers must be at least 1")
    key = args.api_key or os.environ.get(KEY_ENV) or None
    check_exposure(args.host, key, args.insecure_public)
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
        decode_memory=parse_bytes(args.decode_memory),
        public_url=_public_url(args.public_url),
        api_key=key,
        url_ttl=args.url_ttl,
    )
    catalog = open_catalog(specs, opts, args.workers)  # a bad index fails here, before anything is announced
    sock = bind(args.host, args.port)
    host, port = sock.getsockname()[:2]
    if not is_loopback(args.host):
        log.warning(
            "listening on %s: anyone who can reach this address %s",
            args.host,
            "and holds the API key can search the index" if key else "can search the index and see its images",
        )
    names = ", ".join(s.name for s in specs)
    print(f"serving {names} on http://{host}:{port}/  ({args.workers} worker(s); Ctrl-C to stop)", flush=True)
    try:
        serve(specs, opts, sock, workers=args.workers, catalog=catalog)
    finally:
        sock.close()
    return 0


def is_loopback(host: str) -> bool:
    """True for addresses only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: whatever it resolves to, it is not known to be private
        return False


def check_exposure(host: str, key: str | None, insecure_public: bool) -> None:
    """Refuse to show a collection to a network without a key, unless told to."""
    if key is None and not insecure_public and not is_loopback(host):
        raise InputFormatError(
            f"refusing to serve on {host} without an API key: anyone who reaches it would see the images; give "
            f"--api-key KEY (or set {KEY_ENV}), or --insecure-public to serve it to everyone"
        )


def _public_url(url: str | None) -> str | None:
    if url is None:
        return None
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputFormatError(f"--public-url must be an http(s) URL such as https://example.org/lookup, got {url!r}")
    return url.rstrip("/")


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
