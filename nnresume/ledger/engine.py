"""Opening the ledger: SQLite pragmas, and bringing the schema to the newest Alembic revision.

Pragmas, set on every connection:
- journal_mode=WAL: `nnresume status` reads from another shell while the run writes, without blocking either.
- synchronous=FULL: a committed ledger row survives a power cut, which is what makes it the commit point.
- busy_timeout: a reader holding the database for a moment delays a write instead of failing it.
- foreign_keys=ON: SQLite leaves them off by default; deleting a case must delete its rows.

An engine is never carried across fork: workers do not touch the ledger.
"""
from __future__ import annotations

import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.exc import DBAPIError

from ..errors import LedgerError

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000


def _set_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite opens transactions implicitly; pragmas that change the journal must run outside one
    previous = dbapi_connection.isolation_level
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()
        dbapi_connection.isolation_level = previous


def make_engine(path: str | os.PathLike) -> Engine:
    engine = create_engine(f"sqlite:///{os.fspath(path)}", connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
    event.listen(engine, "connect", _set_pragmas)
    return engine


def migrations_location() -> str:
    """The folder holding Alembic's env.py and versions/.

    An installed package carries `migrations/` as `nnresume.migrations` (see pyproject.toml); a source checkout
    that is not installed finds it beside the package.
    """
    try:
        location = resources.files("nnresume.migrations")
        if location.joinpath("env.py").is_file():
            return str(location)
    except ModuleNotFoundError:
        pass
    candidate = Path(__file__).resolve().parents[2] / "migrations"
    if (candidate / "env.py").is_file():
        return str(candidate)
    raise LedgerError("cannot find nnresume's database migrations",
                      "reinstall nnresume; the package is missing its migrations folder")


def alembic_config(engine: Engine) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", migrations_location())
    cfg.set_main_option("sqlalchemy.url", str(engine.url))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    cfg = alembic_config(engine)
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


# The newest migration in migrations/versions. Read-only commands compare the ledger's version with it without
# loading alembic and parsing the migration scripts (a third of `status`'s start-up); tests/test_migrations.py checks
# that it is alembic's head.
HEAD_REVISION = "0003"


def stored_revision(engine: Engine) -> str | None:
    """The ledger's schema version as alembic recorded it (None: none recorded)."""
    with engine.connect() as connection:
        if not inspect(connection).has_table("alembic_version"):
            return None
        return connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()


def open_engine(path: str | os.PathLike, create: bool) -> Engine:
    """Opens the ledger at `path`, creating and upgrading it to the newest schema when `create` is true.

    Without `create` (read-only commands such as `status`), a missing or outdated ledger is an error.
    """
    path = Path(path)
    if not create and not path.exists():
        raise LedgerError(f"no ledger at {path}", "run `nnresume preprocess` on this dataset first")
    path.parent.mkdir(parents=True, exist_ok=True)
    engine = make_engine(path)
    try:
        if create:
            if current_revision(engine) != head_revision(engine):
                log.debug("upgrading ledger %s to the newest schema", path)
                upgrade(engine)
        elif not inspect(engine).has_table("runs"):
            raise LedgerError(f"{path} is not an nnresume ledger (no runs table)")
        elif stored_revision(engine) != HEAD_REVISION:
            raise LedgerError(f"ledger {path} has an older schema than this nnresume",
                              "run `nnresume preprocess` once to upgrade it")
    except DBAPIError as e:
        engine.dispose()
        raise LedgerError(f"cannot open ledger {path}: {e.orig}",
                          "check the file is a SQLite database and the folder is writable") from e
    return engine
