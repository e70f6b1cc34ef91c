"""Texts/s and request latency of the hidden-state server at several client concurrencies.

    python -m benchmarks.server_throughput                           # tiny model, CPU, this machine
    python -m benchmarks.server_throughput --model Qwen/Qwen2.5-0.5B-Instruct --device cuda
    python -m benchmarks.server_throughput --url http://HOST:8000    # a server already running
    python -m benchmarks.server_throughput --max-batch 1 --max-batch 64 --out runs/bench/server.json

The server is started as its own process with the real command line
(``python -m servers.hidden_state_server``), so the load generator does not share its
interpreter. For each concurrency ``c``, ``c`` clients (asyncio tasks, one keep-alive connection
each, speaking bare HTTP/1.1 so the load generator stays cheap) send requests back to back for
``--seconds``; throughput is texts answered per second of wall time, latency is per request. The
server's ``/v1/stats`` before and after each level give the mean texts per model call (how well
micro-batching gathered the concurrent requests) and the share of time the model was busy.
``--max-batch 1`` turns batching off, for comparison; ``--max-wait-ms`` may repeat too.
``--direct`` also times the backend in this process on batches of ``max_batch`` texts: the model's
own rate, without HTTP. ``--stand-in`` serves constant vectors instead of a model (the real app and
uvicorn): what HTTP, JSON and batching cost by themselves; ``--stand-in-dim 896`` gives them the
hidden size of Qwen2.5-0.5B. ``--format json --format f16`` measures each answer format (JSON float
lists, or raw float16 with ``?format=f16``): on large batches JSON costs more than a GPU model.

Requests carry ``--items`` texts each: the canonical texts of Craftax-Classic observations from
env resets (``--source real``, needs JAX) or random well-formed ones (``--source synthetic``), or
with ``--payload observations`` the observations themselves, rendered on the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ENV = "Craftax-Classic-Symbolic-v1"
ROOT = Path(__file__).resolve().parent.parent
PATH = "/v1/hidden_states"


def observations(source: str, num: int) -> np.ndarray:
    from benchmarks.text_obs_speed import real_observations, synthetic_observations

    return real_observations(ENV, num) if source == "real" else synthetic_observations(ENV, num)


class StandInBackend:
    """Vectors without computation: the server's cost besides the model (never for features).
    Values vary (like a model's, not like 1.0) so JSON formatting costs what it would."""

    num_layers = 2

    def __init__(self, hidden_size: int = 32):
        self.hidden_size = hidden_size
        self._rows = np.random.default_rng(0).standard_normal((256, hidden_size)).astype(np.float32)

    def hidden_states(self, texts):
        return self._rows[np.arange(len(texts)) % len(self._rows)]


def serve_stand_in(max_batch: int, max_wait_ms: float, dim: int = 32) -> None:
    """The real app and uvicorn around ``StandInBackend`` (run as this module's child process)."""
    from servers.hidden_state_server import base_url, bind_socket, create_app, serve
    from utils.llm import LLMSpec

    spec = LLMSpec(model="stand-in")
    app = create_app(StandInBackend(dim), spec, max_batch=max_batch, max_wait_ms=max_wait_ms)
    sock = bind_socket("127.0.0.1", 0)
    url = base_url(sock)
    sock.listen(2048)
    print(f"serving on {url}", flush=True)
    serve(app, sock, log_level="warning")


class ServerProcess:
    """A server command (``python -m ...``) on a free port, stopped on exit."""

    def __init__(self, args: list[str]):
        self.args = args
        self.process: subprocess.Popen | None = None
        self.url = ""

    def __enter__(self) -> str:
        command = [sys.executable, "-m", *self.args]
        print("starting:", " ".join(command[1:]), file=sys.stderr, flush=True)
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONPATH": str(ROOT)})
        seen = []
        for line in self.process.stdout:
            seen.append(line)
            found = re.search(r"serving on (http://\S+)", line)
            if found:
                self.url = found.group(1)
                return self.url
        raise SystemExit("the server did not start:\n" + "".join(seen[-20:]))

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.communicate(timeout=60)


def payloads(kind: str, texts: list[str], obs: np.ndarray, items: int) -> list[tuple[bytes, int]]:
    """(JSON body, items) per request, cycling through the texts/observations; encoded once, so
    the load generator does not spend its time in json.dumps."""
    bodies = []
    for start in range(0, len(texts) - items + 1, items):
        if kind == "texts":
            body = {"texts": texts[start:start + items]}
        else:
            body = {"env": ENV, "observations": obs[start:start + items].tolist()}
        bodies.append((json.dumps(body).encode(), items))
    return bodies


class KeepAliveConnection:
    """Bare HTTP/1.1 POSTs on one keep-alive asyncio stream.

    The load generator shares the CPU with the server here, so it must cost far less than what it
    measures: httpx's async pool managed about 90 requests/s at 16 concurrent clients on this
    machine, against a server that answers over 1,000/s to this loop (a stand-in model)."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "http":
            raise SystemExit(f"the load generator speaks plain http://, not {url}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.netloc = parts.netloc
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> "KeepAliveConnection":
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.writer.close()

    async def post(self, path: str, body: bytes) -> tuple[int, bytes, bytes]:
        """(status, header block, body) of one POST."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.netloc}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        header = await self.reader.readuntil(b"\r\n\r\n")
        status = int(header.split(b" ", 2)[1])
        length = re.search(rb"(?im)^content-length:\s*(\d+)", header)
        if length is None:
            raise SystemExit(f"server answered without Content-Length: {header[:200]!r}")
        return status, header, await self.reader.readexactly(int(length.group(1)))


def answered_rows(header: bytes, answer: bytes) -> int:
    """Vectors in an answer: from X-Shape for a binary one, else from the JSON."""
    shape = re.search(rb"(?im)^x-shape:\s*(\d+),", header)
    return int(shape.group(1)) if shape else len(json.loads(answer)["vectors"])


async def load(url: str, bodies: list[tuple[bytes, int]], concurrency: int, seconds: float,
               fmt: str = "json") -> dict:
    """``concurrency`` clients, a connection each, sending back to back for ``seconds``; answers
    in ``fmt`` (json, f16, f32)."""
    path = PATH if fmt == "json" else f"{PATH}?format={fmt}"
    latencies: list[float] = []
    texts = 0

    async def client(index: int, deadline: float) -> None:
        nonlocal texts
        async with KeepAliveConnection(url) as connection:
            i, checked = index, False
            while time.perf_counter() < deadline:
                body, items = bodies[i % len(bodies)]
                i += concurrency
                start = time.perf_counter()
                status, header, answer = await connection.post(path, body)
                latencies.append(time.perf_counter() - start)
                if status != 200:
                    raise SystemExit(f"server answered {status}: {answer[:300]!r}")
                if not checked:  # the first answer per client is parsed; the rest trust the 200
                    if answered_rows(header, answer) != items:
                        raise SystemExit(f"server answered {items} items with another number of vectors")
                    checked = True
                texts += items

    start = time.perf_counter()
    await asyncio.gather(*(client(i, start + seconds) for i in range(concurrency)))
    wall = time.perf_counter() - start
    lat_ms = np.array(latencies) * 1000
    return {"format": fmt, "concurrency": concurrency, "requests": len(latencies), "texts": texts,
            "seconds": round(wall, 2), "texts_per_s": round(texts / wall, 1),
            "p50_ms": round(float(np.percentile(lat_ms, 50)), 1),
            "p95_ms": round(float(np.percentile(lat_ms, 95)), 1)}


def measure_server(url: str, bodies: list[tuple[bytes, int]], levels: list[int], seconds: float,
                   warmup_s: float, formats: tuple[str, ...] = ("json",)) -> list[dict]:
    import httpx

    health = httpx.get(url + "/health", timeout=30).json()
    asyncio.run(load(url, bodies, 1, warmup_s))
    rows = []
    for fmt, concurrency in [(f, c) for f in formats for c in levels]:
        before = httpx.get(url + "/v1/stats", timeout=30).json()
        row = asyncio.run(load(url, bodies, concurrency, seconds, fmt))
        after = httpx.get(url + "/v1/stats", timeout=30).json()
        calls = after["batches"] - before["batches"]
        row["texts_per_model_call"] = round((after["texts"] - before["texts"]) / max(calls, 1), 2)
        # Share of the wall time the model was computing: near 1, the model is the bottleneck;
        # well below, HTTP, JSON or the load generator (same CPU here) is.
        row["model_busy"] = round((after["model_seconds"] - before["model_seconds"]) / row["seconds"], 2)
        row.update(max_batch=health["max_batch"], max_wait_ms=health["max_wait_ms"])
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def measure_client(url: str, texts: list[str], formats: tuple[str, ...], repeats: int = 5) -> list[dict]:
    """``utils.hidden_state_client`` end to end (split, concurrent requests, decoding) on all of
    ``texts`` per wire format: the median of ``repeats`` calls, after one warm-up call."""
    from utils.hidden_state_client import HiddenStateClient

    rows = []
    for fmt in formats:
        with HiddenStateClient(url, wire=fmt) as client:
            client.hidden_states(texts)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                client.hidden_states(texts)
                times.append(time.perf_counter() - start)
        seconds = float(np.median(times))
        rows.append({"client_format": fmt, "texts": len(texts), "median_s": round(seconds, 4),
                     "texts_per_s": round(len(texts) / seconds, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def measure_direct(model: str, device: str, threads: int, texts: list[str], batch: int,
                   seconds: float) -> dict:
    """The backend alone in this process, ``batch`` texts per call: the ceiling for the server."""
    import torch

    from utils.llm import LLMSpec, make_backend

    torch.set_num_threads(threads)
    backend = make_backend(LLMSpec(model=model, device=device, batch_size=batch))
    backend.hidden_states(texts[:batch])
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        chunk = [texts[(done + k) % len(texts)] for k in range(batch)]
        backend.hidden_states(chunk)
        done += batch
    wall = time.perf_counter() - start
    return {"direct_batch": batch, "texts": done, "seconds": round(wall, 2),
            "texts_per_s": round(done / wall, 1)}


def server_settings(args: argparse.Namespace) -> list[tuple[int, float]]:
    """(max_batch, max_wait_ms) per server; max batch 1 never waits, so it runs once."""
    settings = []
    for max_batch in args.max_batch or [64]:
        for max_wait_ms in (args.max_wait_ms or [5.0])[: 1 if max_batch == 1 else None]:
            settings.append((max_batch, max_wait_ms))
    return settings


def markdown(rows: list[dict], direct: list[dict]) -> str:
    lines = ["| max batch | max wait ms | format | concurrency | requests | texts/s | p50 ms | p95 ms "
             "| texts per model call | model busy |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['max_batch']} | {r['max_wait_ms']:g} | {r['format']} | {r['concurrency']} | "
                     f"{r['requests']} | "
                     f"{r['texts_per_s']:,.0f} | {r['p50_ms']} | {r['p95_ms']} | {r['texts_per_model_call']} "
                     f"| {r['model_busy']:.0%} |")
    for d in direct:
        lines.append(f"| {d['direct_batch']} (direct, no HTTP) | - | - | - | - | {d['texts_per_s']:,.0f} | - | - | "
                     f"{d['direct_batch']} | 100% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or hub id (default: the tiny test model)")
    parser.add_argument("--url", help="benchmark this running server instead of starting one")
    parser.add_argument("--device", default="cpu", help="server device: cpu, cuda, cuda:N, auto")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of the server")
    parser.add_argument("--max-batch", type=int, action="append",
                        help="server max batch, one server per value (default: 64)")
    parser.add_argument("--max-wait-ms", type=float, action="append",
                        help="server max wait, one server per value (default: 5)")
    parser.add_argument("--concurrency", type=int, action="append",
                        help="concurrent clients (default: 1, 4, 16, 64)")
    parser.add_argument("--items", type=int, default=1, help="texts or observations per request")
    parser.add_argument("--payload", choices=("texts", "observations"), default="texts")
    parser.add_argument("--source", choices=("real", "synthetic"), default="real")
    parser.add_argument("--num", type=int, default=512, help="distinct observations to cycle through")
    parser.add_argument("--seconds", type=float, default=5.0, help="load time per concurrency")
    parser.add_argument("--warmup-s", type=float, default=1.0)
    parser.add_argument("--direct", action="store_true",
                        help="also time the backend in this process (loads the model here too)")
    parser.add_argument("--stand-in", action="store_true",
                        help="serve constant vectors instead of a model: HTTP, JSON and batching alone")
    parser.add_argument("--stand-in-dim", type=int, default=32,
                        help="hidden size of the stand-in's vectors (896: Qwen2.5-0.5B)")
    parser.add_argument("--format", action="append", choices=("json", "f16", "f32"),
                        help="answer format, one measurement per value (default: json)")
    parser.add_argument("--client", action="store_true",
                        help="also time HiddenStateClient.hidden_states on all --num texts per format")
    parser.add_argument("--serve-stand-in", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.num < args.items:
        parser.error(f"--num {args.num} makes no request of --items {args.items}; pass --num {args.items} or more")
    if args.serve_stand_in:
        serve_stand_in((args.max_batch or [64])[0], (args.max_wait_ms or [5.0])[0], args.stand_in_dim)
        return
    levels = args.concurrency or [1, 4, 16, 64]
    formats = tuple(args.format or ["json"])

    from benchmarks.common import machine_description
    from utils.io import atomic_write_json
    from utils.text_obs import render_texts

    obs = observations(args.source, args.num)
    texts = render_texts(obs, ENV)
    bodies = payloads(args.payload, texts, obs, args.items)
    rows: list[dict] = []
    direct: list[dict] = []
    client: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None and args.url is None and not args.stand_in:
            from utils.testing.tiny_llm import build_tiny_llm

            model = build_tiny_llm(Path(tmp) / "tiny_llm")
        if args.url:
            rows = measure_server(args.url.rstrip("/"), bodies, levels, args.seconds, args.warmup_s,
                                  formats)
        for max_batch, max_wait_ms in ([] if args.url else server_settings(args)):
            limits = ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
            if args.stand_in:
                command = ["benchmarks.server_throughput", "--serve-stand-in", *limits,
                           "--stand-in-dim", str(args.stand_in_dim)]
            else:
                command = ["servers.hidden_state_server", "--port", "0", "--log-level", "warning",
                           "--model", model, "--device", args.device, "--threads", str(args.threads),
                           "--batch-size", str(max_batch), *limits]
            with ServerProcess(command) as url:
                rows += measure_server(url, bodies, levels, args.seconds, args.warmup_s, formats)
                if args.client:
                    client += measure_client(url, texts, formats)
            if args.direct and not args.stand_in and max_batch not in [d["direct_batch"] for d in direct]:
                direct.append(measure_direct(model, args.device, args.threads, texts, max_batch,
                                             args.seconds))
                print(json.dumps(direct[-1]), flush=True)
    result = {"machine": machine_description(), "command": " ".join(["python -m benchmarks.server_throughput",
                                                                     *sys.argv[1:]]),
              "model": (f"stand-in: fixed vectors of dim {args.stand_in_dim}, no model" if args.stand_in
                        else args.model or "tiny random Qwen2 (utils/testing/tiny_llm.py)"), "env": ENV,
              "payload": args.payload, "items_per_request": args.items, "source": args.source,
              "mean_chars": round(float(np.mean([len(t) for t in texts]))),
              "rows": rows, "direct": direct, "client": client}
    if args.out:
        atomic_write_json(args.out, result)
    print()
    print(f"{result['model']}, {args.payload}, {args.items} per request, {result['mean_chars']} "
          f"chars per text; {result['machine']}")
    print(markdown(rows, direct))
    for c in client:
        print(f"client, {c['client_format']}: {c['texts']} texts in {c['median_s'] * 1000:.0f} ms "
              f"({c['texts_per_s']:,.0f} texts/s)")


if __name__ == "__main__":
    main()
