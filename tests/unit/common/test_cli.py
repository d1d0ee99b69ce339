"""Tests for `agent-runner keys create/list/revoke` on a key file in tmp_path."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from libs.common.apikeys import read_key_file
from libs.common.cli import app
from services.api.auth import KeyRing


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    return tmp_path / "etc" / "keys"


def run(*args: str) -> Result:
    """Run `agent-runner` with `args` in-process."""
    return CliRunner().invoke(app, list(args))


def create(key_file: Path, key_id: str) -> str:
    """Create a key with `key_id` and return the key that was printed."""
    result = run("keys", "create", "--file", str(key_file), "--id", key_id)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def test_create_makes_private_file(key_file: Path) -> None:
    create(key_file, "ci")

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_create_prints_key_once(key_file: Path) -> None:
    result = run("keys", "create", "--file", str(key_file), "--id", "ci")
    key = result.stdout.strip()

    assert result.exit_code == 0
    assert result.stdout.count(key) == 1
    assert result.stdout.splitlines() == [key]


def test_created_key_accepted_by_keyring(key_file: Path) -> None:
    key = create(key_file, "ci")

    keyring = KeyRing.load(key_file=key_file, plain_keys=None)

    assert keyring.identify(key) == "ci"


def test_created_key_not_stored(key_file: Path) -> None:
    key = create(key_file, "ci")

    assert key not in key_file.read_text()


def test_create_appends(key_file: Path) -> None:
    first = create(key_file, "ci")
    second = create(key_file, "ops")

    keyring = KeyRing.load(key_file=key_file, plain_keys=None)

    assert keyring.identify(first) == "ci"
    assert keyring.identify(second) == "ops"


def test_create_rejects_duplicate_id(key_file: Path) -> None:
    create(key_file, "ci")

    result = run("keys", "create", "--file", str(key_file), "--id", "ci")

    assert result.exit_code == 2
    assert "already exists" in result.stderr
    assert [key.key_id for key in read_key_file(key_file)] == ["ci"]


@pytest.mark.parametrize("key_id", ["", "a b", "a:b", "ci\n", "k" * 65])
def test_create_rejects_invalid_id(key_file: Path, key_id: str) -> None:
    result = run("keys", "create", "--file", str(key_file), "--id", key_id)

    assert result.exit_code == 2
    assert "is invalid" in result.stderr
    assert not key_file.exists()


def test_list_prints_ids(key_file: Path) -> None:
    create(key_file, "ci")
    create(key_file, "ops")

    result = run("keys", "list", "--file", str(key_file))

    assert result.exit_code == 0
    assert result.stdout.splitlines() == ["ci", "ops"]


def test_revoke_removes_key(key_file: Path) -> None:
    revoked = create(key_file, "ci")
    remaining = create(key_file, "ops")

    result = run("keys", "revoke", "--file", str(key_file), "--id", "ci")
    keyring = KeyRing.load(key_file=key_file, plain_keys=None)

    assert result.exit_code == 0
    assert keyring.identify(revoked) is None
    assert keyring.identify(remaining) == "ops"


def test_revoke_keeps_file_private(key_file: Path) -> None:
    create(key_file, "ci")
    create(key_file, "ops")

    run("keys", "revoke", "--file", str(key_file), "--id", "ci")

    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(path.name for path in key_file.parent.iterdir()) == ["keys"]


def test_revoke_keeps_similar_ids(key_file: Path) -> None:
    create(key_file, "ci")
    create(key_file, "ci2")

    run("keys", "revoke", "--file", str(key_file), "--id", "ci")

    assert [key.key_id for key in read_key_file(key_file)] == ["ci2"]


def test_revoke_unknown_id_exits_2(key_file: Path) -> None:
    create(key_file, "ci")

    result = run("keys", "revoke", "--file", str(key_file), "--id", "ops")

    assert result.exit_code == 2
    assert "no key with id 'ops'" in result.stderr
    assert [key.key_id for key in read_key_file(key_file)] == ["ci"]


def test_revoke_missing_file_exits_2(key_file: Path) -> None:
    result = run("keys", "revoke", "--file", str(key_file), "--id", "ci")

    assert result.exit_code == 2
    assert "cannot read" in result.stderr
