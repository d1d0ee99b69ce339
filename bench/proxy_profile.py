"""CPU profile of our proxy under the proxy benchmark's load, sampled by py-spy.

py-spy is not a dependency of the project. Install it outside the venv
(`pip install --target DIR py-spy`) and pass `--py-spy DIR/bin/py-spy` to bench/proxy.py.
py-spy pauses the proxy for each sample, because samples taken without pausing
(`--nonblocking`) came out with cut stacks here. Pausing and sampling slow the proxy down, so
read the numbers as shares, not as the proxy's cost per request.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SAMPLE_RATE = 200
TOP_FUNCTIONS = 15
STOP_TIMEOUT = 30
# Areas of the code by the start of a frame's file path; the first match wins. py-spy gives
# paths relative to their sys.path entry (`mitmproxy/proxy/server.py`, `asyncio/events.py`).
AREAS = (
    ("services/", "our proxy's code (services/proxy)"),
    ("libs/", "our shared code (libs/common: audit, registry, logs)"),
    ("mitmproxy/", "mitmproxy"),
    ("h11/", "mitmproxy"),
    ("redis/", "redis client"),
    ("nats/", "nats client"),
    ("dns/", "dnspython"),
    ("logging/", "logging and JSON"),
    ("pythonjsonlogger/", "logging and JSON"),
    ("json/", "logging and JSON"),
    ("pydantic", "pydantic"),
    ("asyncio/", "asyncio event loop and sockets"),
    ("selectors.py", "asyncio event loop and sockets"),
    ("socket.py", "asyncio event loop and sockets"),
)
# Areas whose inclusive share means something: the event loop, mitmproxy and our hooks are
# on nearly every stack, so theirs would be close to 100 %.
CALLED_AREAS = {
    "our shared code (libs/common: audit, registry, logs)",
    "redis client",
    "nats client",
    "dnspython",
    "logging and JSON",
    "pydantic",
}


def _path(frame: str) -> str:
    # A frame reads `function (path:line)`.
    inside = frame[frame.rfind("(") + 1 :]
    return inside.rpartition(":")[0]


def _area(frame: str) -> str:
    path = _path(frame)
    for start, area in AREAS:
        if path.startswith(start):
            return area
    return "other"


def summarise(raw: str) -> list[str]:
    """Return report lines for py-spy's raw output (`stack;of;frames count` per line).

    Self time goes to the area of each sample's innermost frame. An area's inclusive time
    counts the samples with a frame of that area anywhere on the stack, so it contains the
    calls that the area makes into others. The same holds for the functions of our own
    code, listed last.
    """
    total = 0
    self_time: Counter[str] = Counter()
    area_inclusive: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        self_time[_area(frames[-1])] += count
        for area in {_area(frame) for frame in frames}:
            area_inclusive[area] += count
        # The entry point and the main loop are on every stack, so they are left out.
        functions = {
            f"{frame[: frame.rfind(' (')]} ({_path(frame)})"
            for frame in frames[2:]
            if _path(frame).startswith(("services/", "libs/"))
        }
        for function in functions:
            ours[function] += count
    if total == 0:
        return ["py-spy recorded no samples"]
    lines = [f"{total} samples; share of samples by area, self and inclusive:"]
    for area, share in self_time.most_common():
        inclusive = f"{area_inclusive[area] / total:6.1%}" if area in CALLED_AREAS else "     -"
        lines.append(f"  {share / total:6.1%} {inclusive}  {area}")
    lines.append("inclusive share of our own functions:")
    lines += [
        f"  {share / total:6.1%}  {frame}" for frame, share in ours.most_common(TOP_FUNCTIONS)
    ]
    return lines


def profile_proxy(py_spy: Path, *, pid: int, output: Path, load: Callable[[], object]) -> None:
    """Sample process `pid` with py-spy while `load` runs, then print the summary."""
    recorder = subprocess.Popen(
        [
            str(py_spy),
            "record",
            "--pid",
            str(pid),
            "--rate",
            str(SAMPLE_RATE),
            "--format",
            "raw",
            "--output",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        # py-spy needs a moment to attach; samples before the load would only show idling.
        time.sleep(1.0)
        load()
    finally:
        recorder.send_signal(signal.SIGINT)
        try:
            _, errors = recorder.communicate(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            recorder.kill()
            _, errors = recorder.communicate()
    if not output.exists():
        raise RuntimeError(f"py-spy wrote no profile: {errors.decode(errors='replace')[-2000:]}")
    print(f"\nprofile of our proxy (pid {pid}) under the proxy path's load:")
    for line in summarise(output.read_text()):
        print(line)
