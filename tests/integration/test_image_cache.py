"""The image cache on a real stack: eviction by size and age, in-use images, purges, restarts.

Three echo-agent images that differ in one file give three tarballs of about 2 MB each. The
stack's --cache-max-size has room for two of them but not three, so the third download evicts
one. The tests run in file order and share the stack. Each starts from an empty cache (a
purge of every image) and compares the totals with those it read before.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.settings import CommonSettings, load_settings
from libs.common.store import AgentStore, connect_redis
from services.supervisor.cache import CacheState, CacheTotals
from services.supervisor.eviction import CacheEntry, EvictionReason
from tests.integration.conftest import Tarball, make_tarball, trusted_sources
from tests.support.images import (
    ECHO_AGENT_ENTRYPOINT,
    build_busybox_image,
    echo_agent_files,
)
from tests.support.stack import FileServer, Stack, free_port, running_stack

pytestmark = pytest.mark.integration

NETWORK = "agent-runner-cache"
SUBNET = "172.29.13.0/24"
BRIDGE = "ar-cache0"
WAIT_SECONDS = 20.0


@dataclass(frozen=True)
class CacheStack:
    """The stack under test, its metrics port and the three tarballs it serves."""

    stack: Stack
    metrics_port: int
    tarballs: dict[str, Tarball]
    image_ids: dict[str, str]


@pytest.fixture(scope="module")
def cache_stack(
    tmp_path_factory: pytest.TempPathFactory, docker_client: docker.DockerClient
) -> Iterator[CacheStack]:
    served = FileServer(tmp_path_factory.mktemp("cache-served"))
    tarballs: dict[str, Tarball] = {}
    image_ids: dict[str, str] = {}
    try:
        for name in ("a", "b", "c"):
            # A random file per image, so no other test or earlier run shares its image ID.
            marker = f"{name}-{uuid.uuid4().hex}".encode()
            image_id = build_busybox_image(
                docker_client,
                entrypoint=list(ECHO_AGENT_ENTRYPOINT),
                cmd=None,
                extra_files={**echo_agent_files(), "etc/variant": marker},
            )
            image_ids[name] = image_id
            tarballs[name] = make_tarball(docker_client, served, image_id, f"{name}.tar")
        largest = max(tarball.path.stat().st_size for tarball in tarballs.values())
        metrics_port = free_port()
        with running_stack(
            tmp_path_factory.mktemp("cache-stack"),
            network=NETWORK,
            subnet=SUBNET,
            bridge=BRIDGE,
            supervisor_args=[
                "--agent-start-timeout=10",
                "--agent-stop-grace=2",
                f"--cache-max-size={2 * largest + largest // 2}",
                f"--metrics-port={metrics_port}",
                *trusted_sources(served.url("")),
            ],
        ) as stack:
            yield CacheStack(stack, metrics_port, tarballs, image_ids)
    finally:
        served.close()
        for image_id in image_ids.values():
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.images.remove(image_id, force=True)


@pytest.fixture
def api(cache_stack: CacheStack) -> Iterator[httpx.Client]:
    stack = cache_stack.stack
    with httpx.Client(base_url=stack.api_url, headers=stack.headers, timeout=90) as client:
        purge_everything(client, stack)
        yield client


def run_redis(action: Callable[[Any], Any]) -> Any:
    """Run the coroutine `action(client)` with a Redis client of the test environment."""

    async def run() -> Any:
        client = connect_redis(load_settings(CommonSettings, []))
        try:
            return await action(client)
        finally:
            await client.aclose()

    return asyncio.run(run())


def cache_state(host_id: str) -> tuple[dict[str, CacheEntry], CacheTotals]:
    """Return the cache entries by digest and the totals that Redis holds for `host_id`."""

    async def read(client: Any) -> tuple[dict[str, CacheEntry], CacheTotals]:
        state = CacheState(client, host_id=host_id)
        entries = {entry.digest: entry for entry in await state.entries()}
        return entries, await state.totals()

    result: tuple[dict[str, CacheEntry], CacheTotals] = run_redis(read)
    return result


def cache_hosts() -> list[str]:
    hosts: list[str] = run_redis(lambda client: AgentStore(client).cache_hosts())
    return hosts


def scrape_metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of the supervisor's metrics, keyed by name and labels."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("agent_runner_image_cache")
    }


def evictions(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], reason: str) -> float:
    return samples[("agent_runner_image_cache_evictions_total", (("reason", reason),))]


def wait_until(
    check: Callable[[], bool], *, description: str, timeout: float = WAIT_SECONDS
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting until {description}")
        time.sleep(0.2)


def start(api: httpx.Client, tarball: Tarball) -> dict[str, Any]:
    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": tarball.url, "image_digest": tarball.digest},
    )
    assert response.status_code == 202, response.text
    agent: dict[str, Any] = response.json()
    assert agent["state"] == "ready", agent
    return agent


def stop(api: httpx.Client, agent: dict[str, Any]) -> None:
    response = api.delete(f"/v1/agents/{agent['agent_id']}")
    assert response.json()["state"] == "stopped", response.text


def run_once(api: httpx.Client, tarball: Tarball) -> None:
    stop(api, start(api, tarball))


def purge(api: httpx.Client, **body: Any) -> httpx.Response:
    return api.post("/v1/cache/purge", json=body)


def purge_everything(api: httpx.Client, stack: Stack) -> None:
    response = purge(api, host_id=stack.host_id)
    assert response.status_code == 200, response.text
    assert response.json()["hosts"][0]["skipped"] == [], "an earlier test left an agent running"
    assert cache_state(stack.host_id)[0] == {}


def host_result(response: httpx.Response, host_id: str) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    by_host = {item["host_id"]: item for item in response.json()["hosts"]}
    result: dict[str, Any] = by_host[host_id]
    return result


def cached_file(stack: Stack, tarball: Tarball) -> Path:
    return stack.workdir / "cache" / "sha256" / f"{tarball.digest.removeprefix('sha256:')}.tar"


def image_loaded(client: docker.DockerClient, image_id: str) -> bool:
    try:
        client.images.get(image_id)
    except docker.errors.ImageNotFound:
        return False
    return True


def eviction_events(stack: Stack, digest: str, reason: str) -> list[dict[str, Any]]:
    return [
        event
        for event in stack.audit_events()
        if event["type"] == "image.cache_evicted"
        and event["details"]["image_digest"] == digest
        and event["reason_code"] == reason
    ]


def wait_for_metric(cache_stack: CacheStack, name: str, value: float) -> None:
    """Wait until the unlabelled sample `name` equals `value`; eviction runs in the background."""
    wait_until(
        lambda: scrape_metrics(cache_stack.metrics_port)[(name, ())] == value,
        description=f"{name} is {value}",
    )


def test_third_download_evicts_least_recently_used(
    api: httpx.Client, cache_stack: CacheStack, docker_client: docker.DockerClient
) -> None:
    stack, tarballs = cache_stack.stack, cache_stack.tarballs
    a, b, c = tarballs["a"], tarballs["b"], tarballs["c"]
    _, before = cache_state(stack.host_id)
    metrics_before = scrape_metrics(cache_stack.metrics_port)
    events_before = len(eviction_events(stack, b.digest, "size"))

    run_once(api, a)
    run_once(api, b)
    run_once(api, a)  # a is now used more recently than b
    run_once(api, c)
    wait_until(lambda: b.digest not in cache_state(stack.host_id)[0], description="b is evicted")
    wait_for_metric(cache_stack, "agent_runner_image_cache_entries", 2)

    entries, totals = cache_state(stack.host_id)
    assert set(entries) == {a.digest, c.digest}
    assert entries[a.digest].hits == 1
    assert entries[a.digest].misses == 1
    assert entries[a.digest].size == a.path.stat().st_size
    assert entries[a.digest].image_id == cache_stack.image_ids["a"]
    assert entries[a.digest].first_used < entries[a.digest].last_used
    assert entries[c.digest].misses == 1
    assert totals.misses == before.misses + 3
    assert totals.hits == before.hits + 1
    assert totals.evictions[EvictionReason.SIZE] == before.evictions[EvictionReason.SIZE] + 1
    assert not cached_file(stack, b).exists()
    assert cached_file(stack, a).exists()
    assert cached_file(stack, c).exists()
    assert not image_loaded(docker_client, cache_stack.image_ids["b"])
    assert image_loaded(docker_client, cache_stack.image_ids["a"])

    samples = scrape_metrics(cache_stack.metrics_port)
    size = a.path.stat().st_size + c.path.stat().st_size
    assert samples[("agent_runner_image_cache_bytes", ())] == size
    hits = ("agent_runner_image_cache_hits_total", ())
    misses = ("agent_runner_image_cache_misses_total", ())
    assert samples[hits] == metrics_before[hits] + 1
    assert samples[misses] == metrics_before[misses] + 3
    assert evictions(samples, "size") == evictions(metrics_before, "size") + 1

    events = eviction_events(stack, b.digest, "size")
    assert len(events) == events_before + 1
    event = events[-1]
    assert event["details"]["reason"] == "size"
    assert event["details"]["size"] == b.path.stat().st_size
    assert event["details"]["loaded_image"] == "removed"
    assert "evicted cached image " + b.digest in stack.log_text("supervisor")


def test_image_of_running_agent_survives(
    api: httpx.Client, cache_stack: CacheStack, docker_client: docker.DockerClient
) -> None:
    stack, tarballs = cache_stack.stack, cache_stack.tarballs
    a, b, c = tarballs["a"], tarballs["b"], tarballs["c"]

    running = start(api, a)  # least recently used from here on, but in use
    run_once(api, b)
    run_once(api, c)
    wait_until(lambda: b.digest not in cache_state(stack.host_id)[0], description="b is evicted")

    entries, _ = cache_state(stack.host_id)
    assert set(entries) == {a.digest, c.digest}
    assert cached_file(stack, a).exists()
    assert image_loaded(docker_client, cache_stack.image_ids["a"])
    wait_for_metric(cache_stack, "agent_runner_image_cache_in_use_entries", 1)
    assert api.get(f"/v1/agents/{running['agent_id']}/http/").status_code == 200
    stop(api, running)


def test_purge_of_one_digest_and_of_everything(
    api: httpx.Client, cache_stack: CacheStack, docker_client: docker.DockerClient
) -> None:
    stack, tarballs = cache_stack.stack, cache_stack.tarballs
    a, b = tarballs["a"], tarballs["b"]
    run_once(api, a)
    running = start(api, b)
    _, before = cache_state(stack.host_id)
    assert stack.host_id in cache_hosts()

    purged_one = purge(api, digest=a.digest)
    one_digest = host_result(purged_one, stack.host_id)
    again = host_result(purge(api, digest=a.digest), stack.host_id)
    busy = host_result(purge(api), stack.host_id)

    assert one_digest == {
        "host_id": stack.host_id,
        "purged": [{"digest": a.digest, "size": a.path.stat().st_size, "image_removed": True}],
        "skipped": [],
        "error": None,
    }
    assert not cached_file(stack, a).exists()
    assert not image_loaded(docker_client, cache_stack.image_ids["a"])
    assert again["purged"] == []
    assert again["skipped"] == [{"digest": a.digest, "reason": "not_cached"}]
    assert busy["purged"] == []
    assert busy["skipped"] == [{"digest": b.digest, "reason": "in_use"}]
    entries, totals = cache_state(stack.host_id)
    assert set(entries) == {b.digest}
    assert totals.evictions[EvictionReason.PURGE] == before.evictions[EvictionReason.PURGE] + 1

    stop(api, running)
    everything = host_result(purge(api), stack.host_id)

    assert everything["purged"] == [
        {"digest": b.digest, "size": b.path.stat().st_size, "image_removed": True}
    ]
    assert cache_state(stack.host_id)[0] == {}
    assert stack.host_id not in cache_hosts()
    assert not image_loaded(docker_client, cache_stack.image_ids["b"])
    samples = scrape_metrics(cache_stack.metrics_port)
    assert samples[("agent_runner_image_cache_entries", ())] == 0
    assert samples[("agent_runner_image_cache_bytes", ())] == 0
    assert evictions(samples, "purge") == before.evictions[EvictionReason.PURGE] + 2
    request_id = purged_one.headers["x-request-id"]
    events = [event for event in stack.audit_events() if event["correlation_id"] == request_id]
    types = [event["type"] for event in events]
    assert sorted(types) == ["image.cache_evicted", "image.cache_purged"]
    purged_event = events[types.index("image.cache_purged")]
    evicted_event = events[types.index("image.cache_evicted")]
    assert purged_event["actor"] == "tests"
    assert purged_event["service"] == "api"
    assert purged_event["details"]["hosts"][stack.host_id]["purged"] == [a.digest]
    assert evicted_event["reason_code"] == "purge"
    assert evicted_event["service"] == "supervisor"
    assert evicted_event["details"]["image_digest"] == a.digest


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        pytest.param({"digest": "sha256:1234"}, 422, "invalid_request", id="short-digest"),
        pytest.param({"host_id": "a.*"}, 422, "invalid_request", id="wildcard-host"),
        pytest.param({"everything": True}, 422, "invalid_request", id="unknown-field"),
    ],
)
def test_bad_purge_removes_nothing(
    api: httpx.Client, cache_stack: CacheStack, body: dict[str, Any], status: int, code: str
) -> None:
    stack = cache_stack.stack
    run_once(api, cache_stack.tarballs["a"])
    before = cache_state(stack.host_id)

    response = purge(api, **body)

    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code
    assert cache_state(stack.host_id) == before
    assert cached_file(stack, cache_stack.tarballs["a"]).exists()


def test_purge_of_host_without_cache_is_empty(api: httpx.Client, cache_stack: CacheStack) -> None:
    stack = cache_stack.stack
    run_once(api, cache_stack.tarballs["a"])
    before = cache_state(stack.host_id)

    response = purge(api, host_id="no-such-host-1")

    assert response.status_code == 200, response.text
    assert response.json()["hosts"] == [
        {"host_id": "no-such-host-1", "purged": [], "skipped": [], "error": None}
    ]
    assert cache_state(stack.host_id) == before
    assert cached_file(stack, cache_stack.tarballs["a"]).exists()


def test_cached_digest_needs_a_trusted_url(
    api: httpx.Client, cache_stack: CacheStack, docker_client: docker.DockerClient
) -> None:
    # Knowing the digest of a cached image must not let a client start it from a URL the
    # supervisor would never download from. The URL is never connected to.
    stack, a = cache_stack.stack, cache_stack.tarballs["a"]
    run_once(api, a)
    before = cache_state(stack.host_id)[0][a.digest]

    response = api.post(
        "/v1/agents",
        params={"wait": "true"},
        json={"image_url": "http://198.51.100.7/agent.tar", "image_digest": a.digest},
    )

    assert response.status_code == 202, response.text
    agent = response.json()
    assert agent["state"] == "failed", agent
    assert agent["failure_reason"] == "source_not_trusted"
    assert "--trusted-image-sources lists " + a.url.rpartition("/")[0] in agent["failure_message"]
    after = cache_state(stack.host_id)[0][a.digest]
    assert (after.hits, after.misses) == (before.hits, before.misses)
    assert cached_file(stack, a).exists()
    assert (
        docker_client.containers.list(
            all=True, filters={"label": f"io.agent-runner.agent-id={agent['agent_id']}"}
        )
        == []
    )


def test_purge_needs_api_key(cache_stack: CacheStack, api: httpx.Client) -> None:
    stack = cache_stack.stack
    run_once(api, cache_stack.tarballs["a"])
    before = cache_state(stack.host_id)

    response = httpx.post(f"{stack.api_url}/v1/cache/purge", json={}, timeout=30)

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    assert cache_state(stack.host_id) == before


def test_cache_state_survives_restart(api: httpx.Client, cache_stack: CacheStack) -> None:
    stack, a = cache_stack.stack, cache_stack.tarballs["a"]
    run_once(api, a)
    entries_before, totals_before = cache_state(stack.host_id)
    metrics_before = scrape_metrics(cache_stack.metrics_port)

    stack.stop_service("supervisor")
    stack.start_supervisor()

    entries_after, totals_after = cache_state(stack.host_id)
    assert entries_after == entries_before
    assert totals_after == totals_before
    assert scrape_metrics(cache_stack.metrics_port) == metrics_before
    # The tarball is not served any more, so only the cache can supply it.
    moved = a.path.with_suffix(".moved")
    a.path.rename(moved)
    try:
        run_once(api, a)
    finally:
        moved.rename(a.path)
    entry = cache_state(stack.host_id)[0][a.digest]
    assert entry.hits == entries_before[a.digest].hits + 1
    assert entry.first_used == entries_before[a.digest].first_used


def test_restart_reconciles_state_with_disk(api: httpx.Client, cache_stack: CacheStack) -> None:
    stack, a, c = cache_stack.stack, cache_stack.tarballs["a"], cache_stack.tarballs["c"]
    run_once(api, a)
    stack.stop_service("supervisor")
    prefix = f"agent-runner:cache:{stack.host_id}:"
    # As after a crash between download and bookkeeping: a's tarball without an entry.
    run_redis(lambda client: client.delete(f"{prefix}entry:{a.digest}"))
    run_redis(lambda client: client.zrem(f"{prefix}lru", a.digest))
    # An entry whose tarball and image are both gone.
    vanished = CacheEntry(
        digest=c.digest,
        size=123,
        image_id="sha256:" + "0" * 64,
        first_used=datetime(2025, 1, 1, tzinfo=UTC),
        last_used=datetime(2025, 1, 1, tzinfo=UTC),
    )
    run_redis(lambda client: CacheState(client, host_id=stack.host_id).put(vanished))

    stack.start_supervisor()

    entries, _ = cache_state(stack.host_id)
    assert set(entries) == {a.digest}
    adopted = entries[a.digest]
    assert adopted.size == a.path.stat().st_size
    assert adopted.image_id == cache_stack.image_ids["a"]
    assert adopted.hits == 0
    assert adopted.misses == 0
    assert "adopted cached tarball " + a.digest in stack.log_text("supervisor")
    assert "dropped cache entry " + c.digest in stack.log_text("supervisor")
    samples = scrape_metrics(cache_stack.metrics_port)
    assert samples[("agent_runner_image_cache_entries", ())] == 1
    assert samples[("agent_runner_image_cache_bytes", ())] == a.path.stat().st_size


def test_metrics_port_in_use_stops_supervisor(cache_stack: CacheStack) -> None:
    stack = cache_stack.stack
    stack.stop_service("supervisor")
    try:
        with socket.create_server(("127.0.0.1", cache_stack.metrics_port)):
            with pytest.raises(RuntimeError) as error:
                stack.start_supervisor()
            assert "exited with status 1" in str(error.value)
    finally:
        stack.processes.pop("supervisor", None)
        stack.start_supervisor()

    expected = (
        f"cannot serve metrics on 127.0.0.1:{cache_stack.metrics_port}: Address already in use; "
        "choose another --metrics-port, or 0 to turn metrics off"
    )
    assert expected in stack.log_text("supervisor")
    samples = scrape_metrics(cache_stack.metrics_port)
    entries, _ = cache_state(stack.host_id)
    assert samples[("agent_runner_image_cache_entries", ())] == len(entries)


def test_unused_images_evicted_by_age(
    api: httpx.Client, cache_stack: CacheStack, docker_client: docker.DockerClient
) -> None:
    stack, a, b = cache_stack.stack, cache_stack.tarballs["a"], cache_stack.tarballs["b"]
    stack.stop_service("supervisor")
    stack.start_supervisor(["--cache-max-age=3", "--cache-eviction-interval=0.5"])
    _, before = cache_state(stack.host_id)
    events_before = len(eviction_events(stack, a.digest, "age"))

    running = start(api, b)
    run_once(api, a)
    # b was last used before a, so it is past --cache-max-age too, but in use.
    wait_until(lambda: a.digest not in cache_state(stack.host_id)[0], description="a is evicted")

    entries, totals = cache_state(stack.host_id)
    assert set(entries) == {b.digest}
    assert totals.evictions[EvictionReason.AGE] == before.evictions[EvictionReason.AGE] + 1
    assert not image_loaded(docker_client, cache_stack.image_ids["a"])
    assert len(eviction_events(stack, a.digest, "age")) == events_before + 1

    stop(api, running)
    wait_until(lambda: cache_state(stack.host_id)[0] == {}, description="b is evicted")
    wait_for_metric(cache_stack, "agent_runner_image_cache_entries", 0)
    samples = scrape_metrics(cache_stack.metrics_port)
    assert evictions(samples, "age") == before.evictions[EvictionReason.AGE] + 2
    assert samples[("agent_runner_image_cache_entries", ())] == 0
