"""aliases and metadata events

aliases: a movable label per name (team/x@prod -> one version), RESTRICT so that a version an
alias points at cannot be removed. alias_events keeps every move (from, to, when, by whom);
metadata_events every edit of tags and descriptions. Tensors and provenance never change.
ux_modules_same_content makes "identical content under one name is one version" hold even
when two writers race to add it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 06:15:27.741567
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0004'
down_revision: Union[str, None] = '0003'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    # An index, not a constraint: SQLite would rebuild the table for a constraint, and the
    # rebuild's DROP TABLE would cascade to tags and hub links.
    op.create_index('ux_modules_same_content', 'modules', ['namespace', 'name', 'digest', 'config_digest'], unique=True)
    op.create_table('alias_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=96), nullable=False),
    sa.Column('name', sa.String(length=96), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('from_version', sa.Integer(), nullable=True),
    sa.Column('to_version', sa.Integer(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('by', sa.String(length=128), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_alias_events'))
    )
    op.create_table('aliases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=96), nullable=False),
    sa.Column('name', sa.String(length=96), nullable=False),
    sa.Column('alias', sa.String(length=64), nullable=False),
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['module_id'], ['modules.id'], name=op.f('fk_aliases_module_id_modules'), ondelete='RESTRICT'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_aliases')),
    sa.UniqueConstraint('namespace', 'name', 'alias', name=op.f('uq_aliases_namespace_name_alias'))
    )
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_aliases_module_id'), ['module_id'], unique=False)

    op.create_table('metadata_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('field', sa.String(length=64), nullable=False),
    sa.Column('old', sa.Text(), nullable=True),
    sa.Column('new', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('by', sa.String(length=128), nullable=False),
    sa.ForeignKeyConstraint(['module_id'], ['modules.id'], name=op.f('fk_metadata_events_module_id_modules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_metadata_events'))
    )
    with op.batch_alter_table('metadata_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_metadata_events_module_id'), ['module_id'], unique=False)



def downgrade() -> None:
    op.drop_index('ux_modules_same_content', table_name='modules')
    with op.batch_alter_table('metadata_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_metadata_events_module_id'))

    op.drop_table('metadata_events')
    with op.batch_alter_table('aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_aliases_module_id'))

    op.drop_table('aliases')
    op.drop_table('alias_events')
