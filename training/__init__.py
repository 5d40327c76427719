"""Data loading and formatting, QLoRA training with TRL, adapter manifests."""
