"""catalog: blobs, modules, tags, derivations

The first schema. Blobs are content-addressed weights files; a module is one registered
version of a name, pointing at a blob; derivations and their inputs are the lineage graph
(an input cannot be deleted while something derived from it exists: ON DELETE RESTRICT).
Timestamps are stored as UTC (registry.db.models.UTCDateTime is DateTime(timezone=True)).

Revision ID: 0001
Revises:
Create Date: 2026-11-24 05:32:47.801168
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0001'
down_revision: Union[str, None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('blobs',
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('digest', name=op.f('pk_blobs'))
    )
    op.create_table('modules',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('namespace', sa.String(length=96), nullable=False),
    sa.Column('name', sa.String(length=96), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.Column('config_digest', sa.String(length=64), nullable=False),
    sa.Column('peft_type', sa.String(length=32), nullable=False),
    sa.Column('composable', sa.Boolean(), nullable=False),
    sa.Column('unsupported', sa.JSON(), nullable=False),
    sa.Column('base_model', sa.String(length=255), nullable=False),
    sa.Column('base_revision', sa.String(length=255), nullable=True),
    sa.Column('task_type', sa.String(length=64), nullable=True),
    sa.Column('task', sa.String(length=128), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('lora_alpha', sa.Float(), nullable=True),
    sa.Column('use_rslora', sa.Boolean(), nullable=False),
    sa.Column('use_dora', sa.Boolean(), nullable=False),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('layers', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('dtype', sa.String(length=16), nullable=False),
    sa.Column('num_parameters', sa.BigInteger(), nullable=False),
    sa.Column('size_bytes', sa.BigInteger(), nullable=False),
    sa.Column('description', sa.Text(), nullable=True),
    sa.Column('owner', sa.String(length=128), nullable=False),
    sa.Column('source', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['digest'], ['blobs.digest'], name=op.f('fk_modules_digest_blobs')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_modules')),
    sa.UniqueConstraint('namespace', 'name', 'version', name=op.f('uq_modules_namespace_name_version'))
    )
    with op.batch_alter_table('modules', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_modules_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_modules_digest'), ['digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_modules_kind'), ['kind'], unique=False)
        batch_op.create_index(batch_op.f('ix_modules_peft_type'), ['peft_type'], unique=False)
        batch_op.create_index(batch_op.f('ix_modules_rank'), ['rank'], unique=False)
        batch_op.create_index(batch_op.f('ix_modules_task'), ['task'], unique=False)

    op.create_table('derivations',
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('expression', sa.Text(), nullable=False),
    sa.Column('canonical', sa.Text(), nullable=False),
    sa.Column('method', sa.String(length=32), nullable=False),
    sa.Column('method_version', sa.Integer(), nullable=False),
    sa.Column('parameters', sa.JSON(), nullable=False),
    sa.Column('results', sa.JSON(), nullable=False),
    sa.Column('environment', sa.JSON(), nullable=False),
    sa.Column('identity', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['module_id'], ['modules.id'], name=op.f('fk_derivations_module_id_modules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('module_id', name=op.f('pk_derivations'))
    )
    with op.batch_alter_table('derivations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_derivations_identity'), ['identity'], unique=False)

    op.create_table('tags',
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=128), nullable=False),
    sa.Column('value', sa.String(length=512), nullable=False),
    sa.ForeignKeyConstraint(['module_id'], ['modules.id'], name=op.f('fk_tags_module_id_modules'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('module_id', 'key', name=op.f('pk_tags'))
    )
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_tags_value'), ['value'], unique=False)

    op.create_table('derivation_inputs',
    sa.Column('module_id', sa.Integer(), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('input_id', sa.Integer(), nullable=False),
    sa.Column('input_digest', sa.String(length=64), nullable=False),
    sa.Column('a', sa.Float(), nullable=False),
    sa.Column('b', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['input_id'], ['modules.id'], name=op.f('fk_derivation_inputs_input_id_modules'), ondelete='RESTRICT'),
    sa.ForeignKeyConstraint(['module_id'], ['derivations.module_id'], name=op.f('fk_derivation_inputs_module_id_derivations'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('module_id', 'position', name=op.f('pk_derivation_inputs'))
    )
    with op.batch_alter_table('derivation_inputs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_derivation_inputs_input_id'), ['input_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('derivation_inputs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_derivation_inputs_input_id'))

    op.drop_table('derivation_inputs')
    with op.batch_alter_table('tags', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_tags_value'))

    op.drop_table('tags')
    with op.batch_alter_table('derivations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_derivations_identity'))

    op.drop_table('derivations')
    with op.batch_alter_table('modules', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_modules_task'))
        batch_op.drop_index(batch_op.f('ix_modules_rank'))
        batch_op.drop_index(batch_op.f('ix_modules_peft_type'))
        batch_op.drop_index(batch_op.f('ix_modules_kind'))
        batch_op.drop_index(batch_op.f('ix_modules_digest'))
        batch_op.drop_index(batch_op.f('ix_modules_base_model'))

    op.drop_table('modules')
    op.drop_table('blobs')
