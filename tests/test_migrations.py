"""The ledger schema comes only from Alembic migrations, and the models do not drift from them."""
from __future__ import annotations

import sqlite3
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from nnresume.ledger import engine as engine_mod
from nnresume.ledger.models import Base
from nnresume.ledger.repository import Ledger


def test_empty_file_upgrades_to_head(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    engine = engine_mod.make_engine(path)
    assert engine_mod.current_revision(engine) is None
    engine_mod.upgrade(engine)
    assert engine_mod.current_revision(engine) == engine_mod.head_revision(engine) is not None
    # read-only commands compare with this constant instead of asking alembic
    assert engine_mod.stored_revision(engine) == engine_mod.HEAD_REVISION == engine_mod.head_revision(engine)
    assert set(inspect(engine).get_table_names()) >= {t.name for t in Base.metadata.sorted_tables}
    engine.dispose()


def test_models_and_migrations_do_not_drift(tmp_path: Path) -> None:
    engine = engine_mod.make_engine(tmp_path / "ledger.sqlite")
    engine_mod.upgrade(engine)
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    assert diff == [], f"models and migrations differ; add a migration: {diff}"
    engine.dispose()


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    engine = engine_mod.make_engine(tmp_path / "ledger.sqlite")
    engine_mod.upgrade(engine)
    cfg = engine_mod.alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "base")
    assert "runs" not in inspect(engine).get_table_names()
    engine_mod.upgrade(engine)
    assert "runs" in inspect(engine).get_table_names()
    engine.dispose()


def test_pragmas_on_every_connection(tmp_path: Path) -> None:
    ledger = Ledger.open(str(tmp_path / "ledger.sqlite"))
    with ledger.engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert c.exec_driver_sql("PRAGMA busy_timeout").scalar() == engine_mod.BUSY_TIMEOUT_MS
        assert c.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    ledger.close()


def test_removing_a_case_removes_its_rows(tmp_path: Path) -> None:
    ledger = Ledger.open(str(tmp_path / "ledger.sqlite"))
    run = ledger.start_run("preprocess", {}, "h", 1, None, "2.8.1", "0", None)
    ledger.ensure_outputs([("a", "x", "2d"), ("b", "x", "2d")])
    ledger.fingerprint_started("a", run, None)
    ledger.remove_cases(["a"])
    con = sqlite3.connect(tmp_path / "ledger.sqlite")
    assert con.execute("select count(*) from outputs").fetchone()[0] == 1
    assert con.execute("select count(*) from fingerprints").fetchone()[0] == 0
    con.close()
    ledger.close()


def test_migrations_are_found_from_the_installed_package() -> None:
    location = Path(engine_mod.migrations_location())
    assert (location / "env.py").is_file() and (location / "versions").is_dir()
