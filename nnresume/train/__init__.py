"""Training: nnU-Net's checkpoints, looked at and repaired (checkpoint.py)."""
