"""Tests for the image config checks that run before `docker load`."""

from __future__ import annotations

from typing import Any

import pytest

from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.image_config import check_image_config


def image(**fields: Any) -> dict[str, Any]:
    """Return an image config whose run settings are a valid command plus `fields`."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/bin/agent"], "Entrypoint": None, **fields},
    }


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(image(), id="cmd-only"),
        pytest.param(image(Cmd=None, Entrypoint=["/bin/agent"]), id="entrypoint-only"),
        pytest.param(image(Cmd="/bin/agent --serve"), id="cmd-string"),
        pytest.param(image(WorkingDir=""), id="workdir-empty"),
        pytest.param(image(WorkingDir=None), id="workdir-null"),
        pytest.param(image(WorkingDir="/"), id="workdir-root"),
        pytest.param(image(WorkingDir="/app"), id="workdir-absolute"),
        pytest.param(image(WorkingDir="/processes"), id="workdir-proc-prefix"),
        pytest.param(image(WorkingDir="/srv/proc"), id="workdir-nested-proc"),
        pytest.param(image(WorkingDir="/proc/../app"), id="workdir-leaves-proc"),
        pytest.param(image(Volumes=None), id="volumes-null"),
        pytest.param(image(Volumes={}), id="volumes-empty"),
        pytest.param(image(Env=["A=1"], User="1000", Labels={"a": "b"}), id="other-fields"),
    ],
)
def test_accepts_safe_config(config: dict[str, Any]) -> None:
    check_image_config(config)


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        pytest.param(image(WorkingDir="app"), FailureReason.WORKDIR_RELATIVE, id="relative"),
        pytest.param(image(WorkingDir="./app"), FailureReason.WORKDIR_RELATIVE, id="dot-relative"),
        pytest.param(image(WorkingDir="/proc"), FailureReason.WORKDIR_FORBIDDEN, id="proc"),
        pytest.param(image(WorkingDir="/proc/"), FailureReason.WORKDIR_FORBIDDEN, id="proc-slash"),
        pytest.param(
            image(WorkingDir="/proc/self/fd/7"), FailureReason.WORKDIR_FORBIDDEN, id="proc-fd"
        ),
        pytest.param(image(WorkingDir="//proc"), FailureReason.WORKDIR_FORBIDDEN, id="two-slashes"),
        pytest.param(
            image(WorkingDir="/x/../proc"), FailureReason.WORKDIR_FORBIDDEN, id="dotdot-proc"
        ),
        pytest.param(
            image(WorkingDir="/../../proc/1"), FailureReason.WORKDIR_FORBIDDEN, id="above-root"
        ),
        pytest.param(
            image(WorkingDir="/./sys/fs/cgroup"), FailureReason.WORKDIR_FORBIDDEN, id="sys"
        ),
        pytest.param(image(WorkingDir="/dev/shm"), FailureReason.WORKDIR_FORBIDDEN, id="dev"),
        pytest.param(
            image(workingdir="/proc"), FailureReason.WORKDIR_FORBIDDEN, id="lowercase-key"
        ),
        pytest.param(image(Volumes={"/data": {}}), FailureReason.VOLUMES_DECLARED, id="volume"),
        pytest.param(
            image(VOLUMES={"/data": {}}), FailureReason.VOLUMES_DECLARED, id="uppercase-key"
        ),
        pytest.param(image(Cmd=None), FailureReason.NO_COMMAND, id="no-command"),
        pytest.param(image(Cmd=[], Entrypoint=[]), FailureReason.NO_COMMAND, id="empty-lists"),
        pytest.param({"os": "linux"}, FailureReason.CONFIG_INVALID, id="config-missing"),
        pytest.param({"config": None}, FailureReason.CONFIG_INVALID, id="config-null"),
        pytest.param({"config": ["/bin/agent"]}, FailureReason.CONFIG_INVALID, id="config-list"),
        pytest.param(image(WorkingDir=7), FailureReason.CONFIG_INVALID, id="workdir-number"),
        pytest.param(image(Volumes=["/data"]), FailureReason.CONFIG_INVALID, id="volumes-list"),
        pytest.param(image(Cmd=["/bin/agent", 1]), FailureReason.CONFIG_INVALID, id="cmd-number"),
        pytest.param(image(Entrypoint={"a": 1}), FailureReason.CONFIG_INVALID, id="entrypoint-obj"),
        pytest.param(
            image(WorkingDir="/app", workingDir="/proc"),
            FailureReason.CONFIG_INVALID,
            id="case-variant-keys",
        ),
        pytest.param(
            {"config": {"Cmd": ["/bin/agent"]}, "Config": {"WorkingDir": "/proc"}},
            FailureReason.CONFIG_INVALID,
            id="case-variant-config",
        ),
        pytest.param(
            image(WorkingDir="/app", **{"WOR\u212aINGDIR": "/proc"}),
            FailureReason.CONFIG_INVALID,
            id="kelvin-sign-key",
        ),
    ],
)
def test_rejects_with_reason(config: dict[str, Any], reason: FailureReason) -> None:
    with pytest.raises(ImageRejected) as caught:
        check_image_config(config)

    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        pytest.param(image(WorkingDir="app"), "'app'", id="relative"),
        pytest.param(image(WorkingDir="//proc"), "'//proc'", id="forbidden"),
        pytest.param(image(Volumes={"/data": {}}), "'/data'", id="volume"),
        pytest.param(image(WorkingDir=7), "7", id="wrong-type"),
    ],
)
def test_message_names_value(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ImageRejected) as caught:
        check_image_config(config)

    assert fragment in caught.value.message
