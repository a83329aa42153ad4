"""ctvq: CT scans to a trained sparse-voxel VQ-VAE tokenizer.

Importing the package reads no environment variables and touches no GPU.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ctvq.Tokenizer`` (the Python API, ``ctvq.tokenizer``), imported on first use: importing ``ctvq``
    itself stays free of torch, which every command line start pays for otherwise."""
    if name in ("Tokenizer", "DecodedField"):
        from ctvq import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'ctvq' has no attribute {name!r}")


__all__ = ["DecodedField", "Tokenizer", "__version__"]
