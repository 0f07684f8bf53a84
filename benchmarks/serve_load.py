"""Load on `lvd index serve`: many concurrent clients on loopback, then stalled connections vs a health probe.

Builds an index over clustered unit vectors (written as embed parts, built by `lvd index
build`'s own function), starts `lvd index serve` as a separate process on 127.0.0.1, and runs
`--clients` keep-alive clients for `--seconds`, each sending clip-retrieval `/knn-service`
queries by embedding back to back. Every answer is checked: status 200, `--k` results, and the
first result equal to exact (numpy) search for that query. Prints requests/s, p50/p99 latency,
the error count and the latency of `/api/health` probes made during the load. Then opens
`--stalled` connections that send nothing or dribble header bytes, and times health probes.

The clients are plain asyncio streams (a few lines of HTTP/1.1), to leave the CPU to the server.
Traffic goes to loopback only, and every loop is bounded in time.

    flock /tmp/lvd-heavy.lock .venv/bin/python benchmarks/serve_load.py --clients 200 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvd.index.store import BuildOptions  # noqa: E402
from lvd.serve.run_inputs import build  # noqa: E402


def make_index(root: Path, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((200, d))
    x = centres[rng.integers(0, 200, n)] + 0.7 * rng.standard_normal((n, d))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)
    (root / "run" / "embed").mkdir(parents=True)
    np.save(root / "run" / "embed" / "part-00000.npy", x)
    np.save(root / "run" / "embed" / "ids-00000.npy", np.arange(n, dtype=np.int64) + 1000)
    build(root / "run" / "embed", root / "index", BuildOptions(factory="Flat", progress=False))
    return x.astype(np.float32)


def start_server(index: Path, workers: int, concurrency: int) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lvd.serve.cli",
            "serve",
            f"bench={index}",
            "--port",
            "0",
            "--workers",
            str(workers),
            "--concurrency",
            str(concurrency),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if "http://127.0.0.1:" in line:
            port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
            break
        if not line and proc.poll() is not None:
            raise SystemExit("the server did not start")
    else:
        raise SystemExit("the server did not start in 120 s")
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc, port
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the server does not accept connections")


class Connection:
    """One keep-alive HTTP/1.1 connection: enough of the protocol for JSON requests and answers."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: bench\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        payload = await self.reader.readexactly(int(headers.get("content-length", 0)))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


async def client(
    port: int,
    bodies: list[bytes],
    firsts: list[int],
    k: int,
    stop: float,
    seed: int,
    latencies: list[float],
    errors: list[str],
) -> None:
    rng = np.random.default_rng(seed)
    conn = Connection(port)
    while time.perf_counter() < stop:
        i = int(rng.integers(len(bodies)))
        t0 = time.perf_counter()
        try:
            status, payload = await asyncio.wait_for(conn.request("POST", "/knn-service", bodies[i]), 30)
            latencies.append(time.perf_counter() - t0)
            hits = json.loads(payload) if status == 200 else None
            if status != 200 or len(hits) != k or hits[0]["id"] != firsts[i]:
                errors.append(f"status {status}: {payload[:120]!r}")
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            await conn.close()
    await conn.close()


async def health_probes(port: int, stop: float, every: float) -> list[float]:
    out = []
    while time.perf_counter() < stop:
        conn = Connection(port)
        t0 = time.perf_counter()
        status, _ = await asyncio.wait_for(conn.request("GET", "/api/health"), 30)
        out.append(time.perf_counter() - t0 if status == 200 else float("inf"))
        await conn.close()
        await asyncio.sleep(every)
    return out


async def load(port: int, clients: int, seconds: float, bodies, firsts, k: int) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    stop = t0 + seconds
    probes = asyncio.create_task(health_probes(port, stop, 0.5))
    await asyncio.gather(*(client(port, bodies, firsts, k, stop, s, latencies, errors) for s in range(clients)))
    wall = time.perf_counter() - t0
    health = await probes
    lat = np.array(latencies) * 1000
    return {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "max_ms": round(float(lat.max()), 1),
        "errors": len(errors),
        "first_errors": errors[:3],
        "health_during_load_ms": {
            "probes": len(health),
            "p50": round(1000 * float(np.median(health)), 1),
            "max": round(1000 * max(health), 1),
        },
    }


async def stalled(port: int, n: int) -> dict:
    """n connections: half send nothing, half dribble a request line; then health probes."""
    conns = []
    for i in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:
            writer.write(b"GET /api/health HTTP/1.1\r\nHo")
        conns.append(writer)
    await asyncio.sleep(0.5)
    for w in conns[1::2]:
        w.write(b"s")
    probes = []
    for _ in range(10):
        conn = Connection(port)
        t0 = time.perf_counter()
        status, _ = await asyncio.wait_for(conn.request("GET", "/api/health"), 10)
        probes.append(time.perf_counter() - t0 if status == 200 else float("inf"))
        await conn.close()
        await asyncio.sleep(0.1)
    for w in conns:
        w.close()
    return {
        "stalled_connections": n,
        "health_probes": len(probes),
        "health_max_ms": round(1000 * max(probes), 2),
        "health_p50_ms": round(1000 * float(np.median(probes)), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--vectors", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--stalled", type=int, default=200)
    args = ap.parse_args()
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    with tempfile.TemporaryDirectory(prefix="lvd-serve-load-") as tmp:
        x = make_index(Path(tmp), args.vectors, args.dim, seed=0)
        rng = np.random.default_rng(1)
        queries = x[rng.integers(0, len(x), 256)] + 0.05 * rng.standard_normal((256, args.dim)).astype(np.float32)
        firsts = (np.argmax(queries @ x.T, axis=1) + 1000).tolist()
        bodies = [
            json.dumps({"embedding_input": q.tolist(), "num_images": args.k, "indice_name": "bench"}).encode()
            for q in queries
        ]
        proc, port = start_server(Path(tmp) / "index", args.workers, args.concurrency)
        try:
            result = asyncio.run(load(port, args.clients, args.seconds, bodies, firsts, args.k))
            result.update(asyncio.run(stalled(port, args.stalled)))
        finally:
            proc.terminate()
            proc.wait(60)
    result.update(vectors=args.vectors, dim=args.dim, k=args.k, workers=args.workers, cpus=os.cpu_count())
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
