"""The packaged migrations: numbered 1, 2, 3, ... (a gap is a lost file or two branches
that took one number), each named as the migrator expects."""

from __future__ import annotations

from conveyor.coordinator.store.migrator import load_migrations


def test_migrations_are_numbered_without_gaps() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert all(m.name.startswith(f"{m.version:04d}_") and m.sql.strip() for m in migrations)
