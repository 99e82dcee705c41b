"""base models: host models and their structure, for porting

One row per (model id, revision); revision is '' when unpinned (a NULL would make the
unique constraint toothless on PostgreSQL).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:49:55.728628
"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


revision: str = '0002'
down_revision: Union[str, None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    op.create_table('base_models',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('model_id', sa.String(length=255), nullable=False),
    sa.Column('revision', sa.String(length=255), nullable=False),
    sa.Column('architecture', sa.String(length=128), nullable=True),
    sa.Column('model_type', sa.String(length=64), nullable=True),
    sa.Column('dimensions', sa.JSON(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('structure', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_base_models')),
    sa.UniqueConstraint('model_id', 'revision', name=op.f('uq_base_models_model_id_revision'))
    )


def downgrade() -> None:
    op.drop_table('base_models')
