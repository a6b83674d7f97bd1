"""Initial ledger schema: runs, cases and their input files, fingerprints, outputs, configurations,
dataset-level artifacts, attempts and memory samples.

Revision ID: 0001
Revises: 
Create Date: 2026-11-21 20:08:21.721991

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0001'
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table('cases',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('input_digest', sa.String(length=64), nullable=True),
    sa.Column('header', sa.JSON(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('configurations',
    sa.Column('data_identifier', sa.String(length=255), nullable=False),
    sa.Column('configuration', sa.String(length=255), nullable=False),
    sa.Column('plans_identifier', sa.String(length=255), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('data_identifier')
    )
    op.create_table('runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('command', sa.String(length=32), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=True),
    sa.Column('status', sa.Enum('running', 'completed', 'completed_with_failures', 'interrupted', 'failed', name='runstatus', native_enum=False, length=32), nullable=False),
    sa.Column('end_reason', sa.Text(), nullable=True),
    sa.Column('arguments', sa.JSON(), nullable=False),
    sa.Column('nnunetv2_version', sa.String(length=32), nullable=False),
    sa.Column('nnresume_version', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('pid_started_at', sa.Float(), nullable=True),
    sa.Column('workers', sa.Integer(), nullable=True),
    sa.Column('budget_bytes', sa.BigInteger(), nullable=True),
    sa.Column('peak_tree_rss', sa.BigInteger(), nullable=True),
    sa.Column('log_file', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('artifacts',
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('details', sa.JSON(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('attempts',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('case_name', sa.String(length=255), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('targets', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.Float(), nullable=False),
    sa.Column('ended_at', sa.Float(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('exit_code', sa.Integer(), nullable=True),
    sa.Column('signal', sa.Integer(), nullable=True),
    sa.Column('peak_rss', sa.BigInteger(), nullable=True),
    sa.Column('last_rss', sa.BigInteger(), nullable=True),
    sa.Column('estimate_bytes', sa.BigInteger(), nullable=True),
    sa.Column('budget_bytes', sa.BigInteger(), nullable=True),
    sa.Column('message', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.create_index('ix_attempts_run_id', ['run_id'], unique=False)

    op.create_table('fingerprints',
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('pending', 'running', 'done', 'failed', 'quarantined', name='taskstate', native_enum=False, length=32), nullable=False),
    sa.Column('key', sa.String(length=64), nullable=True),
    sa.Column('input_digest', sa.String(length=64), nullable=True),
    sa.Column('result_file', sa.Text(), nullable=True),
    sa.Column('result_size', sa.BigInteger(), nullable=True),
    sa.Column('result_sha256', sa.String(length=64), nullable=True),
    sa.Column('shape_after_crop', sa.JSON(), nullable=True),
    sa.Column('spacing', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('deaths', sa.Integer(), nullable=False),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('peak_rss', sa.BigInteger(), nullable=True),
    sa.Column('estimate_bytes', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('case_id')
    )
    op.create_table('input_files',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.Column('channel', sa.Integer(), nullable=False),
    sa.Column('path', sa.Text(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=False),
    sa.Column('digest', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('case_id', 'role', 'channel', name='uq_input_files_case_role_channel')
    )
    op.create_table('memory_samples',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.Integer(), nullable=False),
    sa.Column('t', sa.Float(), nullable=False),
    sa.Column('tree_rss', sa.BigInteger(), nullable=False),
    sa.Column('available', sa.BigInteger(), nullable=False),
    sa.Column('budget', sa.BigInteger(), nullable=False),
    sa.Column('running', sa.Integer(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('memory_samples', schema=None) as batch_op:
        batch_op.create_index('ix_memory_samples_run_id', ['run_id'], unique=False)

    op.create_table('outputs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('case_id', sa.Integer(), nullable=False),
    sa.Column('data_identifier', sa.String(length=255), nullable=False),
    sa.Column('configuration', sa.String(length=255), nullable=False),
    sa.Column('state', sa.Enum('pending', 'running', 'done', 'failed', 'quarantined', name='taskstate', native_enum=False, length=32), nullable=False),
    sa.Column('config_hash', sa.String(length=64), nullable=True),
    sa.Column('input_digest', sa.String(length=64), nullable=True),
    sa.Column('files', sa.JSON(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('deaths', sa.Integer(), nullable=False),
    sa.Column('duration_s', sa.Float(), nullable=True),
    sa.Column('peak_rss', sa.BigInteger(), nullable=True),
    sa.Column('estimate_bytes', sa.BigInteger(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('run_id', sa.Integer(), nullable=True),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['case_id'], ['cases.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='SET NULL'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('case_id', 'data_identifier', name='uq_outputs_case_data_identifier')
    )
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.create_index('ix_outputs_state', ['state'], unique=False)



def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('outputs', schema=None) as batch_op:
        batch_op.drop_index('ix_outputs_state')

    op.drop_table('outputs')
    with op.batch_alter_table('memory_samples', schema=None) as batch_op:
        batch_op.drop_index('ix_memory_samples_run_id')

    op.drop_table('memory_samples')
    op.drop_table('input_files')
    op.drop_table('fingerprints')
    with op.batch_alter_table('attempts', schema=None) as batch_op:
        batch_op.drop_index('ix_attempts_run_id')

    op.drop_table('attempts')
    op.drop_table('artifacts')
    op.drop_table('runs')
    op.drop_table('configurations')
    op.drop_table('cases')
