"""hub links, external inputs, and version counters

hub_links records where a module was pulled from or pushed to (repo, commit, weights oid).
derivation_inputs.input_id becomes nullable: an input known only from provenance imported
from the Hub is an external node (its digest, plus repo and commit in `external`) until a
module with that digest is registered. module_names keeps the last version given to each
name, so that removing the latest version never lets a later registration reuse its number;
it starts from the versions already registered. Downgrading deletes external edges first:
the older schema cannot hold them.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 06:02:50.655841
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0003'
down_revision: Union[str, None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('module_names',
    sa.Column('namespace', sa.String(length=96), nullable=False),
    sa.Column('name', sa.String(length=96), nullable=False),
    sa.Column('last_version', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('namespace', 'name', name=op.f('pk_module_names'))
    )
    op.execute(
        "INSERT INTO module_names (namespace, name, last_version) "
        "SELECT namespace, name, MAX(version) FROM modules GROUP BY namespace, name"
    )
    op.create_table('hub_links',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('direction', sa.String(length=8), nullable=False),
    sa.Column('endpoint', sa.String(length=255), nullable=False),
    sa.Column('repo_id', sa.String(length=255), nullable=False),
    sa.Column('revision', sa.String(length=255), nullable=False),
    sa.Column('commit', sa.String(length=64), nullable=False),
    sa.Column('weights_oid', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['module_id'], ['modules.id'], name=op.f('fk_hub_links_module_id_modules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_hub_links'))
    )
    with op.batch_alter_table('hub_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_hub_links_module_id'), ['module_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_hub_links_repo_id'), ['repo_id'], unique=False)

    with op.batch_alter_table('derivation_inputs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('external', sa.JSON(), nullable=True))
        batch_op.alter_column('input_id',
               existing_type=sa.INTEGER(),
               nullable=True)
        batch_op.create_index(batch_op.f('ix_derivation_inputs_input_digest'), ['input_digest'], unique=False)



def downgrade() -> None:
    op.execute("DELETE FROM derivation_inputs WHERE input_id IS NULL")
    with op.batch_alter_table('derivation_inputs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_derivation_inputs_input_digest'))
        batch_op.alter_column('input_id',
               existing_type=sa.INTEGER(),
               nullable=False)
        batch_op.drop_column('external')

    with op.batch_alter_table('hub_links', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_hub_links_repo_id'))
        batch_op.drop_index(batch_op.f('ix_hub_links_module_id'))

    op.drop_table('hub_links')
    op.drop_table('module_names')
