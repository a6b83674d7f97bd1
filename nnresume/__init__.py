"""nnresume: resumable, memory-aware preprocessing for nnU-Net v2, with outputs identical to nnU-Net's."""
__version__ = "0.1.0"
