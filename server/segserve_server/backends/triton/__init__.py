"""The Triton backend: a model's batches run on remote Triton servers (`backend`), balanced over
the pool of those servers with ejection and readmission (`pool`)."""

__all__: list[str] = []
