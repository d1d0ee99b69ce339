"""Benchmark: throughput and p99 of an authenticated, rate-limited route against bare FastAPI.

Run from the repository root: `.venv/bin/python -m bench.gateway [--concurrency N] [--seconds S]`.

Two servers run side by side, each in a process of its own with the same uvicorn settings as
`agent-runner-api` (services/api/main.py: uvicorn's automatic choice of event loop and HTTP
parser, which is uvloop and httptools when `uvicorn[standard]` is installed, no access log,
`limit_concurrency=2000`, `timeout_keep_alive=5`). The report names that loop and parser.
The two servers:

- gateway: the real `agent-runner-api` with its own nats-server and the shared Redis, rate
  limits far above the offered load so that every request is checked and none is rejected.
  The route is `GET /v1/agents/<unknown id>` with an API key, which costs the key check, four
  rate-limit buckets (one of them only checked) in one Redis script call, the request-id,
  metrics and body-limit middleware, one Redis GET for the record and a 404 error body. The
  gateway sends the script calls and the GETs of the requests of one event-loop turn in one
  pipeline each. With `--path /v1/agents/ag-unknown` the id has the wrong form and the Redis
  GET is skipped.
- bare: a FastAPI app with one route of the same path that returns the same kind of 404 JSON
  body without middleware, Redis or a key.

The load client is this process: `--concurrency` asyncio tasks, each with one keep-alive
connection, send a request and read the whole response before sending the next. Each run
lasts `--seconds`, and the runs alternate bare, gateway, bare, gateway, so both share the
machine's noise. Every response must be the expected 404, or the run fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from bench.harness import Deadline, milliseconds, percentile, run_main, workdir
from tests.support.stack import VENV_BIN, Stack, free_port

TARGET_RATIO = 0.6
HIGH_LIMIT = "1000000"
UNKNOWN_AGENT_PATH = "/v1/agents/ag-" + "0" * 32
# An id of the wrong form, for which the route returns 404 without reading Redis.
MALFORMED_AGENT_PATH = "/v1/agents/ag-unknown"
CONNECT_TIMEOUT = 30.0
RESPONSE_TIMEOUT = 10.0
# Maximum size of a response head that the client accepts; both servers send a few hundred
# bytes.
MAX_HEAD = 16 * 1024


def bare_app() -> FastAPI:
    """Return the bare app: one route with the gateway's path and a 404 JSON body."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/v1/agents/{agent_id}")
    async def get_agent(agent_id: str) -> JSONResponse:
        body = {"error": {"code": "agent_not_found", "message": f"no agent with id {agent_id!r}"}}
        return JSONResponse(body, status_code=404)

    return app


def serve_bare(port: int) -> None:
    """Serve bare_app on 127.0.0.1:`port` the way services/api/main.py serves the gateway."""
    config = uvicorn.Config(
        bare_app(),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        limit_concurrency=2000,
        timeout_keep_alive=5,
    )
    server = uvicorn.Server(config)
    with asyncio.Runner(loop_factory=config.get_loop_factory()) as runner:
        runner.run(server.serve())


@dataclass
class RunResult:
    """The requests one run completed and the latency of each, in seconds."""

    name: str
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        """Requests per second."""
        return len(self.latencies) / self.seconds


async def _worker(
    port: int, request: bytes, end: float, latencies: list[float], max_requests: int
) -> None:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port), CONNECT_TIMEOUT
    )
    loop = asyncio.get_running_loop()
    try:
        while loop.time() < end and len(latencies) < max_requests:
            began = time.perf_counter()
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), RESPONSE_TIMEOUT)
            if len(head) > MAX_HEAD or not head.startswith(b"HTTP/1.1 404 "):
                raise RuntimeError(f"expected 404 from port {port}, got {head[:200]!r}")
            length = _content_length(head)
            await asyncio.wait_for(reader.readexactly(length), RESPONSE_TIMEOUT)
            latencies.append(time.perf_counter() - began)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    raise RuntimeError(f"response without Content-Length: {head[:200]!r}")


async def _load(
    port: int,
    headers: dict[str, str],
    *,
    path: str,
    concurrency: int,
    seconds: float,
    max_requests: int,
) -> tuple[float, list[float]]:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode()
    latencies: list[float] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    end = began + seconds
    await asyncio.gather(
        *(_worker(port, request, end, latencies, max_requests) for _ in range(concurrency))
    )
    return loop.time() - began, latencies


def load(name: str, port: int, headers: dict[str, str], args: argparse.Namespace) -> RunResult:
    """Send requests at `args.concurrency` for `args.seconds` and return what completed."""
    elapsed, latencies = asyncio.run(
        _load(
            port,
            headers,
            path=args.path,
            concurrency=args.concurrency,
            seconds=args.seconds,
            max_requests=args.max_requests,
        )
    )
    return RunResult(name=name, seconds=elapsed, latencies=latencies)


@contextlib.contextmanager
def bare_server(folder: Path) -> Iterator[int]:
    """Start the bare app in a subprocess and return its port; stop it by pid afterwards."""
    port = free_port()
    log = (folder / "bare.log").open("ab")
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.gateway", "--serve-bare", str(port)],
        stdout=log,
        stderr=log,
        env=os.environ.copy(),
    )
    try:
        _wait_until_serving(port, process, folder / "bare.log")
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
        log.close()


def _wait_until_serving(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"bare server exited with {process.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}{UNKNOWN_AGENT_PATH}", timeout=1, trust_env=False)
            return
        time.sleep(0.1)
    raise RuntimeError(f"bare server did not respond within 30 s; see {log}")


@contextlib.contextmanager
def gateway_server(folder: Path) -> Iterator[Stack]:
    """Start nats-server and the real gateway, with limits above the offered load."""
    stack = Stack(
        workdir=folder / "gateway",
        netguard=False,
        api_args=[
            f"--rate-limit={HIGH_LIMIT}",
            f"--rate-limit-burst={HIGH_LIMIT}",
            f"--global-rate-limit={HIGH_LIMIT}",
            f"--global-rate-limit-burst={HIGH_LIMIT}",
            "--log-level=WARNING",
        ],
    )
    try:
        stack.workdir.mkdir(parents=True, exist_ok=True)
        stack.api_key = subprocess.run(
            [
                VENV_BIN / "agent-runner",
                "keys",
                "create",
                "--file",
                stack.workdir / "api-keys",
                "--id",
                "bench",
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        stack.start_nats()
        stack.start_api()
        yield stack
    finally:
        for name in ("api", "nats"):
            if name in stack.processes:
                stack.stop_service(name)
        stack._forget_cache_state()


def server_stack() -> str:
    """Name the event loop and HTTP parser that uvicorn's automatic choice picks here.

    uvicorn 0.55 takes uvloop and httptools when it can import them (uvicorn/loops/auto.py,
    uvicorn/protocols/http/auto.py). Both servers run from this venv, so both get the same.
    """
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} event loop, {parser} HTTP parser"


def report(results: list[RunResult]) -> float:
    """Print each run and the totals; return the ratio of gateway to bare throughput."""
    print(f"both servers: uvicorn {uvicorn.__version__}, {server_stack()}")
    print(f"{'run':<10}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}")
    for result in results:
        print(
            f"{result.name:<10}{len(result.latencies):>10}{result.rate:>10.0f}"
            f"{milliseconds(percentile(result.latencies, 0.5)):>9}"
            f"{milliseconds(percentile(result.latencies, 0.99)):>9}"
        )
    totals = {}
    for name in ("bare", "gateway"):
        runs = [result for result in results if result.name == name]
        latencies = [latency for result in runs for latency in result.latencies]
        rate = len(latencies) / sum(result.seconds for result in runs)
        totals[name] = rate
        print(
            f"{name + ' all':<10}{len(latencies):>10}{rate:>10.0f}"
            f"{milliseconds(percentile(latencies, 0.5)):>9}"
            f"{milliseconds(percentile(latencies, 0.99)):>9}"
        )
    ratio = totals["gateway"] / totals["bare"]
    verdict = "meets" if ratio >= TARGET_RATIO else "misses"
    print(f"gateway/bare throughput: {ratio:.2f} ({verdict} the target of {TARGET_RATIO})")
    return ratio


def run(args: argparse.Namespace) -> None:
    """Start both servers, warm them up and alternate measured runs between them."""
    deadline = Deadline(args.max_seconds)
    with workdir() as folder, bare_server(folder) as bare_port, gateway_server(folder) as stack:
        targets = [("bare", bare_port, {}), ("gateway", stack.api_port, stack.headers)]
        warm_up = argparse.Namespace(**{**vars(args), "seconds": 1.0})
        for name, port, headers in targets:
            load(name, port, headers, warm_up)
        results = []
        for _ in range(args.rounds):
            for name, port, headers in targets:
                deadline.check(f"{name} run")
                results.append(load(name, port, headers, args))
        report(results)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=32, help="connections (default 32)")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each run (default 5)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="runs per server, alternating (default 3)"
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=1_000_000,
        help="maximum requests per run, a bound on top of --seconds (default 1000000)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=300.0, help="give up after this long (default 300)"
    )
    parser.add_argument(
        "--path",
        choices=[UNKNOWN_AGENT_PATH, MALFORMED_AGENT_PATH],
        default=UNKNOWN_AGENT_PATH,
        help="route to load: an unknown agent id, whose 404 needs a Redis GET (default), or "
        "an id of the wrong form, whose 404 does not",
    )
    parser.add_argument("--serve-bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not 1 <= args.concurrency <= 1000:
        parser.error(f"--concurrency={args.concurrency} must be from 1 to 1000")
    if not 0 < args.seconds <= 120:
        parser.error(f"--seconds={args.seconds} must be over 0 and at most 120")
    if not 1 <= args.rounds <= 20:
        parser.error(f"--rounds={args.rounds} must be from 1 to 20")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, or serve the bare app when started with --serve-bare."""
    args = parse_args(argv)
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return 0
    return run_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
