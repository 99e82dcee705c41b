"""module ids are never reused

SQLite gives a new row the highest id in use plus one, so removing the newest module let
the next registration take its id: a compose that had resolved that module as an input then
recorded the new row, often itself, as its input. AUTOINCREMENT makes SQLite remember the
highest id ever given (in sqlite_sequence). A table's id cannot be changed in place on
SQLite, so modules is rebuilt (copied, dropped, renamed; migrations/env.py turns foreign keys
off around it, or the DROP would cascade to tags, derivations, metadata events and Hub
links). Its rows keep their ids. PostgreSQL sequences never reuse a value: nothing to do.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 07:00:00.000000
"""
from typing import Sequence, Union

from alembic import op


revision: str = '0005'
down_revision: Union[str, None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    # AUTOINCREMENT needs the primary key written on the column, so it loses its name
    # (pk_modules) on SQLite; nothing refers to that name.
    with op.batch_alter_table('modules', recreate='always', table_kwargs={'sqlite_autoincrement': True}):
        pass


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table('modules', recreate='always', table_kwargs={'sqlite_autoincrement': False}) as batch_op:
        batch_op.create_primary_key('pk_modules', ['id'])
