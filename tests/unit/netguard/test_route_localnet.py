"""Tests for reading route_localnet while interfaces come and go."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from services.netguard.nft import route_localnet_values


def make_conf(root: Path, values: dict[str, str]) -> Path:
    for name, value in values.items():
        (root / name).mkdir(parents=True)
        (root / name / "route_localnet").write_text(value + "\n")
    return root


def test_reads_every_interface(tmp_path: Path) -> None:
    conf = make_conf(tmp_path, {"all": "0", "lo": "0", "veth1": "1"})

    assert route_localnet_values(conf) == {"all": "0", "lo": "0", "veth1": "1"}


def test_interface_removed_while_reading_is_left_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An agent's veth disappears when its container stops, between the listing and the read;
    # netguard once died of the FileNotFoundError.
    conf = make_conf(tmp_path, {"all": "0", "veth1": "0", "veth2": "1"})
    original = Path.read_text

    def read_and_remove_next(path: Path, *args: object, **kwargs: object) -> str:
        if path.parent.name == "all":
            shutil.rmtree(conf / "veth1")
        return original(path)

    monkeypatch.setattr(Path, "read_text", read_and_remove_next)

    assert route_localnet_values(conf) == {"all": "0", "veth2": "1"}
