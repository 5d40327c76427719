"""Base-model loading, the adapter registry on disk, adapter residency and the batched generator."""
