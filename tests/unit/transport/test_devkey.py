"""Finding a local ``conveyor dev``'s key: only a live one, only for the address it listens
on, from the working directory or above it, and never over a key given or exported."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.transport import ConnectionOptions
from conveyor.transport._devkey import DEV_DATA_DIR, find_dev_key
from conveyor.transport._options import API_KEY_ENV

KEY = "cvk_aaaaaaaaaaaa_secret"


def _dev(folder: Path, pid: int, address: str) -> Path:
    data = folder / DEV_DATA_DIR
    data.mkdir(parents=True)
    (data / "admin.key").write_text(KEY + "\n")
    (data / "dev.lock").write_text(f"{pid}\n{address}\n")
    return data


def test_a_live_dev_on_the_dialled_address_lends_its_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    data = _dev(tmp_path / "clone", os.getpid(), "127.0.0.1:50071")
    below = tmp_path / "clone" / "myapp"
    below.mkdir()
    caplog.set_level("INFO", logger="conveyor.transport")
    found = find_dev_key(["127.0.0.1:50071"], below)
    assert found is not None and (found.key, found.path) == (KEY, data / "admin.key")
    assert str(data / "admin.key") in caplog.text  # says where it found it
    # Another address, or a folder outside the clone: nothing.
    assert find_dev_key(["10.0.0.5:50071"], below) is None
    assert find_dev_key(["127.0.0.1:50071"], tmp_path) is None

    monkeypatch.chdir(below)
    merged = ConnectionOptions.merge(None, addresses=["127.0.0.1:50071"])
    assert merged.api_key == KEY
    # A key given, or exported, wins; a process serving others' keys never looks.
    given = ConnectionOptions.merge(None, api_key="cvk_given", addresses=["127.0.0.1:50071"])
    assert given.api_key == "cvk_given"
    refused = ConnectionOptions(find_api_key=False)
    assert ConnectionOptions.merge(refused, addresses=["127.0.0.1:50071"]).api_key is None
    monkeypatch.setenv(API_KEY_ENV, "cvk_exported")
    assert ConnectionOptions.merge(None, addresses=["127.0.0.1:50071"]).api_key == "cvk_exported"


def test_a_stopped_dev_lends_nothing(tmp_path: Path) -> None:
    _dev(tmp_path, 2**22 + 12345, "127.0.0.1:50072")  # no such pid (above pid_max)
    assert find_dev_key(["127.0.0.1:50072"], tmp_path) is None
