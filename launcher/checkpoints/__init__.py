"""Checkpoints in and out: the contract (what a tag holds), the sharded store (save, verify,
resume, rotate), universal conversion, the Hugging Face layout, and trained models for use."""
