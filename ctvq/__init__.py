"""ctvq: CT scans to a trained sparse-voxel VQ-VAE tokenizer.

Importing the package reads no environment variables and touches no GPU.
"""

__version__ = "0.1.0"
