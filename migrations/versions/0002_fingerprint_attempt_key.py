"""Fingerprints record what their last attempt was made from, so a quarantined case that never produced a
result is left alone until its inputs or the extractor change.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 20:28:49.368968

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0002'
down_revision: Union[str, Sequence[str], None] = '0001'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('fingerprints', schema=None) as batch_op:
        batch_op.add_column(sa.Column('attempt_key', sa.String(length=64), nullable=True))



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('fingerprints', schema=None) as batch_op:
        batch_op.drop_column('attempt_key')

