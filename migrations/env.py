"""Alembic environment for the nnresume ledger.

nnresume runs migrations itself (`nnresume.ledger.engine.upgrade`), passing an open connection in
`config.attributes["connection"]`. For development, `alembic -c migrations/alembic.ini revision --autogenerate`
works from the repository root against the URL in that file.
"""
from alembic import context
from sqlalchemy import engine_from_config, pool

from nnresume.ledger.models import Base

config = context.config
target_metadata = Base.metadata


def _configure_and_run(connection) -> None:
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure_and_run(connection)
        return
    engine = engine_from_config(config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.",
                                poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure_and_run(connection)


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
