"""The etcd that `conveyor bench-failover` starts by itself: healthy, then gone."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path

import pytest

from conveyor.bench.etcd import HOW_TO_GET_ETCD, _healthy, local_etcd
from conveyor.cli.errors import CLIError


async def test_local_etcd_runs_and_stops() -> None:
    folder = Path(tempfile.mkdtemp(prefix="conveyor-test-bench-etcd-"))
    try:
        async with local_etcd(folder) as url:
            assert url.startswith("http://127.0.0.1:")
            assert await asyncio.to_thread(_healthy, url)
        assert not await asyncio.to_thread(_healthy, url)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def test_no_etcd_binary_says_how_to_get_one(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import conveyor.bench.etcd as bench_etcd

    monkeypatch.setattr(bench_etcd, "find_etcd", lambda: None)
    with pytest.raises(CLIError, match="needs an etcd") as raised:
        async with local_etcd(tmp_path):
            pass
    assert str(raised.value) == HOW_TO_GET_ETCD
