"""Tests for ImageStore's load step with a fake Docker: what happens when Docker disagrees."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.supervisor.docker_adapter import ImageRemoval
from services.supervisor.download import DownloadLimits
from services.supervisor.errors import FailureReason, ImageRejected
from services.supervisor.images import ImageStore
from services.supervisor.tarball import TarballLimits
from tests.unit.supervisor.test_tarball import good_legacy_untagged


class FakeDocker:
    """Docker that loads an image other than the one the manifest names."""

    def __init__(self, loaded: list[str]) -> None:
        self.loaded = loaded
        self.removed: list[str] = []

    def image_exists(self, image_id: str) -> bool:
        return False

    def tag_owner(self, tag: str) -> str | None:
        return None

    def load_image(self, path: Path) -> list[str]:
        return self.loaded

    def remove_image(self, image_id: str) -> ImageRemoval:
        self.removed.append(image_id)
        return ImageRemoval.REMOVED


def store(docker: Any, tmp_path: Path) -> ImageStore:
    return ImageStore(
        docker,
        cache_dir=tmp_path / "cache",
        download_limits=DownloadLimits(
            max_size=1 << 20,
            connect_timeout=1,
            read_timeout=1,
            total_timeout=1,
            allow_http=True,
        ),
        tarball_limits=TarballLimits(max_members=100, max_total_size=1 << 20),
    )


def test_image_loaded_under_another_id_is_removed(tmp_path: Path) -> None:
    tarball = good_legacy_untagged(tmp_path / "image.tar")
    other = "sha256:" + "e" * 64
    docker = FakeDocker([other])
    subject = store(docker, tmp_path)

    with pytest.raises(ImageRejected) as error:
        subject._verify_and_load(tarball, "sha256:" + "0" * 64)

    assert error.value.reason is FailureReason.IMAGE_ID_MISMATCH
    assert docker.removed == [other]
