"""Benchmark: the audit sink's sustained rate and added latency against a bare JetStream consumer.

Run from the repository root: `.venv/bin/python -m bench.audit [--events N] [--rounds R]`.

Each phase gets a fresh private nats-server (tests/support/audit_sink.py) and one consumer of
the AUDIT stream in its own process:

- baseline: a pull consumer that fetches batches of 1000 and acknowledges each message without
  parsing or writing anything, with the sink's ack settings;
- sink: the real `agent-runner-audit` (production profile, a key from `agent-runner audit
  keygen`, --audit-checkpoint-interval=1), which validates, chains, writes, fsyncs, then acks.

In each phase this process first publishes `--events` AuditEvents before the consumer starts,
and measures how long the consumer takes to acknowledge that backlog. Then it publishes
`--events` more as fast as JetStream accepts them, with `--window` publishes in flight, each
with its event id as Nats-Msg-Id as the services send them. The sustained rate is the count
divided by the time from the first publish until the consumer's ack floor reaches the last
event. Then it publishes `--latency-events` one at a time at `--latency-rate` per second and
polls the consumer's ack floor without pause. The latency of an event is the time from just
before its publish until the first poll that shows it acknowledged, so it includes up to one
poll, a JetStream API request. For the sink an acknowledgement means the record is fsync'd.
Finally `agent-runner audit verify` checks the sink's folder and its duration is reported.
Phases alternate baseline, sink, for `--rounds` rounds, and the sink's figures are printed as
ratios to the same round's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.harness import Deadline, interrupts_raise, milliseconds, percentile, workdir
from libs.common import bus
from libs.common.messages import AUDIT_STREAM, AUDIT_SUBJECTS, AuditEvent, AuditOutcome
from tests.support.audit_sink import AuditSinkProcess, NatsServer, create_signing_key
from tests.support.stack import REPO_ROOT, VENV_BIN

BASELINE_CONSUMER = "bench-baseline"
SINK_CONSUMER = "audit-sink"
FETCH_BATCH = 1000


@dataclass(frozen=True)
class PhaseResult:
    """Measurements of one phase."""

    name: str
    events: int
    publish_seconds: float  # until JetStream acknowledged the last publish
    drain_seconds: float  # from the first publish until the consumer acknowledged the last
    backlog_seconds: float  # from the consumer's start until it acknowledged the backlog
    latencies: list[float]  # seconds, publish to acknowledged by the consumer
    verify_seconds: float | None = None
    records: int = 0  # in the folder that was verified

    @property
    def rate(self) -> float:
        """Sustained events per second, publish to consumer acknowledgement."""
        return self.events / self.drain_seconds

    @property
    def backlog_rate(self) -> float:
        """Events per second of a consumer that finds `events` waiting in the stream."""
        return self.events / self.backlog_seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000, help="events per rate run")
    parser.add_argument("--window", type=int, default=500, help="publishes in flight")
    parser.add_argument("--latency-events", type=int, default=1000, help="events per latency run")
    parser.add_argument(
        "--latency-rate", type=float, default=200.0, help="events per second in latency runs"
    )
    parser.add_argument("--rounds", type=int, default=2, help="baseline and sink rounds")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="give up after this")
    parser.add_argument("--baseline-consumer", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def make_event(number: int) -> AuditEvent:
    """Return an event of a typical size: an authentication decision with a few details."""
    return AuditEvent(
        service="api",
        host="bench",
        type="auth.attempt",
        actor="key:bench",
        outcome=AuditOutcome.SUCCESS,
        correlation_id=f"req-{number:012d}",
        reason_code="key_valid",
        details={"client": "198.51.100.7", "method": "GET", "path": f"/v1/agents/{number}"},
    )


async def connect(server: NatsServer) -> tuple[NatsClient, JetStreamContext]:
    client = await nats.connect(server.url, user="tests", password=server.password)
    return client, await bus.ensure_audit_stream(client)


async def publish_fast(jetstream: JetStreamContext, count: int, window: int) -> int:
    """Publish `count` events with `window` in flight; return the stream seq of the last."""
    last = 0
    for start in range(0, count, window):
        events = [make_event(number) for number in range(start, min(count, start + window))]
        acks = await asyncio.gather(
            *(
                jetstream.publish(
                    event.subject, bus.encode(event), headers={"Nats-Msg-Id": event.event_id}
                )
                for event in events
            )
        )
        last = max(last, *(ack.seq for ack in acks))
    return last


async def ack_floor(jetstream: JetStreamContext, consumer: str) -> int:
    info = await jetstream.consumer_info(AUDIT_STREAM, consumer)
    return int(info.ack_floor.stream_seq if info.ack_floor else 0)


async def wait_for_floor(
    jetstream: JetStreamContext, consumer: str, seq: int, deadline: Deadline
) -> None:
    while await ack_floor(jetstream, consumer) < seq:
        deadline.check(f"waiting for {consumer} to acknowledge sequence {seq}")
        await asyncio.sleep(0.005)


async def publish_backlog(server: NatsServer, args: argparse.Namespace) -> int:
    client, jetstream = await connect(server)
    try:
        return await publish_fast(jetstream, args.events, args.window)
    finally:
        await client.close()


async def measure_backlog(server: NatsServer, consumer: str, last: int, deadline: Deadline) -> None:
    client, jetstream = await connect(server)
    try:
        await wait_for_floor(jetstream, consumer, last, deadline)
    finally:
        await client.close()


async def measure_rate(
    server: NatsServer, consumer: str, args: argparse.Namespace, deadline: Deadline
) -> tuple[int, float, float]:
    client, jetstream = await connect(server)
    try:
        first = await ack_floor(jetstream, consumer)
        started = time.perf_counter()
        last = await publish_fast(jetstream, args.events, args.window)
        published = time.perf_counter()
        assert last - first >= args.events, (first, last)
        await wait_for_floor(jetstream, consumer, last, deadline)
        return last, published - started, time.perf_counter() - started
    finally:
        await client.close()


async def measure_latency(
    server: NatsServer, consumer: str, args: argparse.Namespace, deadline: Deadline
) -> list[float]:
    publisher, jetstream = await connect(server)
    poller, poll_jetstream = await connect(server)
    published: dict[int, float] = {}
    acknowledged: dict[int, float] = {}
    done = asyncio.Event()

    # Read before the first publish, so an acknowledgement is never counted as the start.
    seen = await ack_floor(poll_jetstream, consumer)

    async def poll() -> None:
        nonlocal seen
        while not done.is_set() or seen < max(published, default=0):
            floor = await ack_floor(poll_jetstream, consumer)
            now = time.perf_counter()
            for seq in range(seen + 1, floor + 1):
                acknowledged[seq] = now
            seen = max(seen, floor)
            deadline.check("polling the ack floor")

    try:
        polling = asyncio.create_task(poll())
        interval = 1 / args.latency_rate
        next_at = time.perf_counter()
        for number in range(args.latency_events):
            event = make_event(number)
            sent = time.perf_counter()
            ack = await jetstream.publish(
                event.subject, bus.encode(event), headers={"Nats-Msg-Id": event.event_id}
            )
            published[ack.seq] = sent
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        done.set()
        await polling
        return [acknowledged[seq] - sent for seq, sent in published.items()]
    finally:
        await publisher.close()
        await poller.close()


def run_phase(
    name: str,
    folder: Path,
    args: argparse.Namespace,
    *,
    key: Path,
    public_key: Path,
    deadline: Deadline,
) -> PhaseResult:
    phase_dir = folder / name
    phase_dir.mkdir(parents=True)
    server = NatsServer(phase_dir)
    try:
        backlog = asyncio.run(publish_backlog(server, args))
        with consumer_process(name, server, phase_dir, key) as (consumer, started):
            asyncio.run(measure_backlog(server, consumer, backlog, deadline))
            backlog_seconds = time.perf_counter() - started
            _, publish_seconds, drain_seconds = asyncio.run(
                measure_rate(server, consumer, args, deadline)
            )
            latencies = asyncio.run(measure_latency(server, consumer, args, deadline))
        verify_seconds = None
        records = 0
        if name == "sink":
            started = time.perf_counter()
            output = subprocess.run(
                [
                    VENV_BIN / "agent-runner",
                    "audit",
                    "verify",
                    str(phase_dir / "audit"),
                    "--key",
                    str(public_key),
                ],
                check=True,
                timeout=600,
                capture_output=True,
                text=True,
            ).stdout
            verify_seconds = time.perf_counter() - started
            records = int(output.split()[1])
        return PhaseResult(
            name=name,
            events=args.events,
            publish_seconds=publish_seconds,
            drain_seconds=drain_seconds,
            backlog_seconds=backlog_seconds,
            latencies=latencies,
            verify_seconds=verify_seconds,
            records=records,
        )
    finally:
        server.stop()


@contextlib.contextmanager
def consumer_process(
    name: str, server: NatsServer, phase_dir: Path, key: Path
) -> Iterator[tuple[str, float]]:
    """Run the phase's consumer in its own process; yield its name and when it was ready.

    The sink counts as ready once it logs that it started, after recovery and the consumer
    setup; the baseline once it printed "ready".
    """
    if name == "sink":
        sink = AuditSinkProcess(server, phase_dir / "audit", key, "--audit-checkpoint-interval=1")
        sink.start()
        try:
            yield SINK_CONSUMER, time.perf_counter()
        finally:
            status = sink.stop()
            if status != 0:
                raise RuntimeError(f"the sink exited with {status}; see {sink.log}")
        return
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.audit", "--baseline-consumer"],
        env=server.env(),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            raise RuntimeError("the baseline consumer did not start")
        yield BASELINE_CONSUMER, time.perf_counter()
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


async def baseline_consumer() -> None:
    """Consume AUDIT and acknowledge every message without reading it, until SIGTERM."""
    client = await nats.connect(
        os.environ["AGENT_RUNNER_NATS_URL"],
        user=os.environ["AGENT_RUNNER_NATS_USER"],
        password=os.environ["AGENT_RUNNER_NATS_PASSWORD"],
    )
    jetstream = await bus.ensure_audit_stream(client)
    await jetstream.add_consumer(
        AUDIT_STREAM,
        ConsumerConfig(
            name=BASELINE_CONSUMER,
            durable_name=BASELINE_CONSUMER,
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=120,
            max_ack_pending=4 * FETCH_BATCH,
            filter_subject=AUDIT_SUBJECTS,
        ),
    )
    subscription = await jetstream.pull_subscribe_bind(
        durable=BASELINE_CONSUMER, stream=AUDIT_STREAM
    )
    stopped = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopped.set)
    print("ready", flush=True)
    while not stopped.is_set():
        try:
            messages = await subscription.fetch(FETCH_BATCH, timeout=0.5)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for message in messages:
            await message.ack()
    await client.close()


def report(rounds: list[tuple[PhaseResult, PhaseResult]]) -> None:
    print(
        "\nround phase     live/s  backlog/s  publish/s  lat p50 ms  p95 ms  p99 ms  max ms"
        "  verify s"
    )
    for number, pair in enumerate(rounds, start=1):
        for result in pair:
            lat = result.latencies
            verify = f"{result.verify_seconds:8.2f}" if result.verify_seconds else "       -"
            print(
                f"{number:5d} {result.name:8s} {result.rate:7.0f} {result.backlog_rate:10.0f} "
                f"{result.events / result.publish_seconds:10.0f} "
                f"{milliseconds(percentile(lat, 0.5))}    {milliseconds(percentile(lat, 0.95))}"
                f"{milliseconds(percentile(lat, 0.99))}{milliseconds(max(lat))}  {verify}"
            )
    print("\nsink / baseline, same round:")
    for number, (baseline, sink) in enumerate(rounds, start=1):
        p50 = percentile(sink.latencies, 0.5) - percentile(baseline.latencies, 0.5)
        p99 = percentile(sink.latencies, 0.99) - percentile(baseline.latencies, 0.99)
        print(
            f"round {number}: live rate x{sink.rate / baseline.rate:.2f}, backlog rate "
            f"x{sink.backlog_rate / baseline.backlog_rate:.2f}, latency p50 "
            f"x{percentile(sink.latencies, 0.5) / percentile(baseline.latencies, 0.5):.2f} "
            f"(+{p50 * 1000:.1f} ms), p99 "
            f"x{percentile(sink.latencies, 0.99) / percentile(baseline.latencies, 0.99):.2f} "
            f"(+{p99 * 1000:.1f} ms); verify {sink.records / (sink.verify_seconds or 1):.0f} "
            "records/s"
        )


def run(args: argparse.Namespace) -> None:
    deadline = Deadline(args.max_seconds)
    rounds = []
    with workdir() as folder:
        key = folder / "keys" / "audit-signing.pem"
        public_key = create_signing_key(key)
        for number in range(1, args.rounds + 1):
            round_dir = folder / f"round{number}"
            baseline = run_phase(
                "baseline", round_dir, args, key=key, public_key=public_key, deadline=deadline
            )
            sink = run_phase(
                "sink", round_dir, args, key=key, public_key=public_key, deadline=deadline
            )
            rounds.append((baseline, sink))
            print(
                f"round {number}: baseline {baseline.rate:.0f}/s, sink {sink.rate:.0f}/s",
                file=sys.stderr,
            )
    report(rounds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.baseline_consumer:
        asyncio.run(baseline_consumer())
        return 0
    try:
        with interrupts_raise():
            run(args)
    except KeyboardInterrupt:
        print("interrupted; cleanup finished", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
