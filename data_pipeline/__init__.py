"""Corpus fetching, tokenization and memory-mapped token datasets."""
