"""Tests for the resource monitor's limit warnings, limit stops, usage and metric series."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from libs.common.messages import StopReason
from libs.common.settings import load_settings
from services.supervisor import metrics
from services.supervisor.cgroups import (
    CgroupReader,
    CgroupUnavailable,
    CpuReading,
    DiskReading,
    MemoryReading,
    PidsReading,
    ResourceSample,
)
from services.supervisor.gvisor_stats import GvisorStatsUnavailable, GvisorTasks
from services.supervisor.monitor import TASK_REFRESH_ROUNDS, Resource, ResourceMonitor
from services.supervisor.settings import SupervisorSettings

MIB = 1024 * 1024
AGENT = "ag-" + "1" * 32
RUNC = ["--runtime=runc", "--no-require-gvisor"]


def make_sample(
    *,
    at: float = 100.0,
    memory: int = 10 * MIB,
    oom_kills: int = 0,
    cpu_seconds: float = 1.0,
    pids: int = 4,
    pids_hits: int = 0,
    tmp_used: int = 0,
) -> ResourceSample:
    return ResourceSample(
        monotonic=at,
        memory=MemoryReading(
            usage=memory,
            working_set=memory,
            max_usage=memory + MIB,
            limit=64 * MIB,
            failcnt=0,
            oom_kills=oom_kills,
        ),
        cpu=CpuReading(
            usage_seconds=cpu_seconds,
            periods=10,
            throttled_periods=0,
            throttled_seconds=0.0,
            limit_cpus=0.5,
        ),
        pids=PidsReading(current=pids, limit=64, peak=pids, limit_hits=pids_hits),
        disks=(
            DiskReading(
                mount_point="/tmp", used=tmp_used, size=8 * MIB, available=8 * MIB - tmp_used
            ),
        ),
    )


@pytest.fixture
def monitor() -> ResourceMonitor:
    settings = load_settings(
        SupervisorSettings,
        [*RUNC, "--limit-warning-fraction=0.8", "--lifetime-warning-seconds=10"],
    )
    return ResourceMonitor(settings)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({}, None),
        ({"oom_kills": 1}, StopReason.OUT_OF_MEMORY),
        ({"pids_hits": 3}, StopReason.PIDS_LIMIT_REACHED),
        ({"pids": 63}, None),
        ({"pids": 64}, StopReason.PIDS_LIMIT_REACHED),
        ({"tmp_used": 8 * MIB}, StopReason.DISK_LIMIT_REACHED),
        ({"tmp_used": 8 * MIB - 4096}, None),
        ({"oom_kills": 1, "pids_hits": 3, "tmp_used": 8 * MIB}, StopReason.OUT_OF_MEMORY),
        ({"pids_hits": 3, "tmp_used": 8 * MIB}, StopReason.PIDS_LIMIT_REACHED),
    ],
)
def test_limit_stop_reason(
    monitor: ResourceMonitor, changes: dict[str, int], reason: StopReason | None
) -> None:
    assessment = monitor.assess(AGENT, make_sample(**changes))

    assert assessment.stop == reason
    assert bool(assessment.detail) == (reason is not None)


def test_disk_stop_detail_names_mount(monitor: ResourceMonitor) -> None:
    assessment = monitor.assess(AGENT, make_sample(tmp_used=8 * MIB))

    assert assessment.detail == f"/tmp is full ({8 * MIB} of {8 * MIB} bytes)"


def test_memory_warning_once_per_crossing(monitor: ResourceMonitor) -> None:
    first = monitor.assess(AGENT, make_sample(at=1, memory=52 * MIB))
    again = monitor.assess(AGENT, make_sample(at=2, memory=60 * MIB))
    below = monitor.assess(AGENT, make_sample(at=3, memory=20 * MIB))
    rearmed = monitor.assess(AGENT, make_sample(at=4, memory=55 * MIB))

    assert [warning.resource for warning in first.warnings] == [Resource.MEMORY]
    assert first.warnings[0].usage == 52 * MIB
    assert first.warnings[0].limit == 64 * MIB
    assert first.warnings[0].fraction == pytest.approx(52 / 64)
    assert again.warnings == ()
    assert below.warnings == ()
    assert [warning.resource for warning in rearmed.warnings] == [Resource.MEMORY]


def test_disk_warning_names_mount(monitor: ResourceMonitor) -> None:
    assessment = monitor.assess(AGENT, make_sample(tmp_used=7 * MIB))

    assert len(assessment.warnings) == 1
    details = assessment.warnings[0].details()
    assert details == {
        "resource": "disk",
        "usage": 7 * MIB,
        "limit": 8 * MIB,
        "fraction": 0.875,
        "mount_point": "/tmp",
    }


def test_pids_warning(monitor: ResourceMonitor) -> None:
    assessment = monitor.assess(AGENT, make_sample(pids=60))

    assert [warning.resource for warning in assessment.warnings] == [Resource.PIDS]


def test_cpu_warning_uses_rate_between_samples(monitor: ResourceMonitor) -> None:
    first = monitor.assess(AGENT, make_sample(at=10, cpu_seconds=5.0))
    idle = monitor.assess(AGENT, make_sample(at=11, cpu_seconds=5.1))
    busy = monitor.assess(AGENT, make_sample(at=12, cpu_seconds=5.55))

    assert first.warnings == ()
    assert idle.warnings == ()
    assert [warning.resource for warning in busy.warnings] == [Resource.CPU]
    assert busy.warnings[0].usage == pytest.approx(0.45)
    assert busy.warnings[0].limit == 0.5


def test_lifetime_warning_once(monitor: ResourceMonitor) -> None:
    expires = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    early = monitor.lifetime_warning_due(AGENT, expires, expires - timedelta(seconds=11))
    due = monitor.lifetime_warning_due(AGENT, expires, expires - timedelta(seconds=9))
    repeated = monitor.lifetime_warning_due(AGENT, expires, expires - timedelta(seconds=5))

    assert early is False
    assert due is True
    assert repeated is False


def test_lifetime_warning_off_at_zero() -> None:
    settings = load_settings(SupervisorSettings, [*RUNC, "--lifetime-warning-seconds=0"])
    monitor = ResourceMonitor(settings)
    expires = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)

    assert monitor.lifetime_warning_due(AGENT, expires, expires) is False


def test_usage_keeps_peaks(monitor: ResourceMonitor) -> None:
    monitor.assess(AGENT, make_sample(at=1, memory=30 * MIB, pids=20, tmp_used=5 * MIB))
    monitor.assess(AGENT, make_sample(at=2, memory=10 * MIB, pids=3, tmp_used=MIB, cpu_seconds=7))

    usage = monitor.usage(AGENT)

    assert usage is not None
    assert usage.memory_peak_bytes == 31 * MIB
    assert usage.pids_peak == 20
    assert usage.disk_peak_bytes == {"/tmp": 5 * MIB}
    assert usage.cpu_seconds == 7
    assert usage.oom_kills == 0


def test_usage_of_unsampled_agent_is_none(monitor: ResourceMonitor) -> None:
    assert monitor.usage(AGENT) is None


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(metrics.AGENT_RESOURCES)
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_metric_series_removed_on_forget(monitor: ResourceMonitor) -> None:
    monitor.assess(AGENT, make_sample(tmp_used=MIB))
    monitor.publish()
    published = scrape()
    monitor.forget(AGENT)
    forgotten = scrape()

    labels = (("agent_id", AGENT),)
    assert published[("agent_runner_agent_memory_bytes", labels)] == 10 * MIB
    assert published[("agent_runner_agent_pids_limit", labels)] == 64
    assert published[("agent_runner_agent_cpu_seconds_total", labels)] == 1.0
    disk = (("agent_id", AGENT), ("mount_point", "/tmp"))
    assert published[("agent_runner_agent_disk_bytes", disk)] == MIB
    assert published[("agent_runner_agent_disk_limit_bytes", disk)] == 8 * MIB
    assert not [key for key in forgotten if ("agent_id", AGENT) in key[1]]


class FakeReader(CgroupReader):
    """Return prepared samples per container id; a missing one reads as an absent cgroup."""

    def __init__(self, samples: dict[str, ResourceSample]) -> None:
        super().__init__()
        self.samples = samples

    def sample(self, container_id: str, *, mount_points: tuple[str, ...]) -> ResourceSample:
        if container_id not in self.samples:
            raise CgroupUnavailable(f"/sys/fs/cgroup/memory/docker/{container_id}", "gone")
        return self.samples[container_id]


def fake_monitor(samples: dict[str, ResourceSample]) -> ResourceMonitor:
    settings = load_settings(SupervisorSettings, RUNC)
    return ResourceMonitor(settings, reader=FakeReader(samples))


def test_new_container_resets_state() -> None:
    monitor = fake_monitor({"c1": make_sample(memory=60 * MIB), "c2": make_sample()})

    first = monitor.sample_all({AGENT: "c1"})
    monitor.assess(AGENT, first[AGENT])
    monitor.sample_all({AGENT: "c2"})

    assert monitor.usage(AGENT) is None


def test_unreadable_cgroup_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    monitor = fake_monitor({})

    first = monitor.sample_all({AGENT: "gone"})
    second = monitor.sample_all({AGENT: "gone"})

    assert first == {}
    assert second == {}
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert f"cannot monitor cgroup of agent {AGENT}" in messages[0]


def test_final_sample_of_exited_container_keeps_earlier_usage() -> None:
    monitor = fake_monitor({"c1": make_sample(memory=20 * MIB)})
    monitor.sample_one(AGENT, "c1")
    monitor.reader = FakeReader({})

    monitor.sample_one(AGENT, "c1")

    usage = monitor.usage(AGENT)
    assert usage is not None
    assert usage.memory_peak_bytes == 21 * MIB


class FakeTasks(GvisorTasks):
    """Stand-in runs: the next `result` after `start` returns `value`, or fails when it is None."""

    def __init__(self, value: int | None) -> None:
        super().__init__(runsc=Path("/nonexistent/runsc"), root=Path("/nonexistent"))
        self.value = value
        self.calls = 0
        self.pending: set[str] = set()

    def start(self, container_id: str) -> bool:
        if container_id in self.pending:
            return False
        self.calls += 1
        self.pending.add(container_id)
        return True

    def result(self, container_id: str) -> int | None:
        if container_id not in self.pending:
            return None
        self.pending.discard(container_id)
        if self.value is None:
            raise GvisorStatsUnavailable(f"runsc events failed for container {container_id}")
        return self.value

    def cancel(self, container_id: str) -> None:
        self.pending.discard(container_id)


def runsc_monitor(samples: dict[str, ResourceSample], tasks: FakeTasks) -> ResourceMonitor:
    settings = load_settings(
        SupervisorSettings,
        ["--runtime=runsc", "--container-pids-limit=64", "--limit-warning-fraction=0.8"],
    )
    return ResourceMonitor(settings, reader=FakeReader(samples), tasks=tasks)


def test_runsc_counts_tasks_inside_gvisor() -> None:
    # 300 host threads belong to the sandbox; gVisor counts 5 tasks of the agent.
    monitor = runsc_monitor({"c1": make_sample(pids=300)}, FakeTasks(5))

    first = monitor.sample_all({AGENT: "c1"})[AGENT]
    sample = monitor.sample_all({AGENT: "c1"})[AGENT]

    # The count asked for in the first round arrives in the second.
    assert first.pids.current == 300
    assert (sample.pids.current, sample.pids.limit) == (5, 64)
    assert monitor.assess(AGENT, sample).stop is None


def test_runsc_stops_at_nproc_limit() -> None:
    monitor = runsc_monitor({"c1": make_sample(pids=456)}, FakeTasks(64))

    monitor.sample_all({AGENT: "c1"})
    sample = monitor.sample_all({AGENT: "c1"})[AGENT]
    assessment = monitor.assess(AGENT, sample)

    assert assessment.stop == StopReason.PIDS_LIMIT_REACHED
    assert assessment.detail == "64 tasks at the pids limit of 64"


def test_runsc_count_refresh_rules() -> None:
    tasks = FakeTasks(5)
    monitor = runsc_monitor({"c1": make_sample(pids=300)}, tasks)

    # Round 1 requests a count and round 2 collects it. Then nothing changes for
    # TASK_REFRESH_ROUNDS rounds.
    for _ in range(TASK_REFRESH_ROUNDS + 1):
        monitor.sample_all({AGENT: "c1"})
    assert tasks.calls == 1

    monitor.sample_all({AGENT: "c1"})
    assert tasks.calls == 2

    monitor.sample_all({AGENT: "c1"})
    monitor.reader = FakeReader({"c1": make_sample(pids=310)})
    monitor.sample_all({AGENT: "c1"})
    assert tasks.calls == 3


def test_runsc_counts_each_round_near_limit() -> None:
    tasks = FakeTasks(60)
    monitor = runsc_monitor({"c1": make_sample(pids=300)}, tasks)

    for _ in range(4):
        monitor.sample_all({AGENT: "c1"})

    assert tasks.calls == 4


def test_runsc_final_sample_starts_no_run() -> None:
    tasks = FakeTasks(5)
    monitor = runsc_monitor({"c1": make_sample(pids=300)}, tasks)

    monitor.sample_one(AGENT, "c1")

    assert tasks.calls == 0


def test_runsc_failed_count_keeps_host(
    caplog: pytest.LogCaptureFixture,
) -> None:
    monitor = runsc_monitor({"c1": make_sample(pids=300)}, FakeTasks(None))

    monitor.sample_all({AGENT: "c1"})
    second = monitor.sample_all({AGENT: "c1"})[AGENT]
    monitor.sample_all({AGENT: "c1"})

    assert second.pids.current == 300
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"cannot monitor gvisor tasks of agent {AGENT}: runsc events failed for container c1; "
        "its limits are still enforced by the kernel but not reported"
    ]


def test_runsc_no_volume_lookup_skips_disk(caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(SupervisorSettings, ["--runtime=runsc"])

    monitor = ResourceMonitor(settings)

    assert monitor.mount_points == ()
    assert "disk use of agents is not monitored" in caplog.text


def test_runsc_measures_volumes() -> None:
    settings = load_settings(SupervisorSettings, ["--runtime=runsc"])

    monitor = ResourceMonitor(settings, mount_sources=lambda container_id: {})

    assert monitor.mount_points == ("/tmp", "/dev/shm")
    assert monitor.reader.mount_sources is not None


def test_runc_watches_both_tmpfs_mounts() -> None:
    settings = load_settings(SupervisorSettings, RUNC)

    assert ResourceMonitor(settings).mount_points == ("/tmp", "/dev/shm")
