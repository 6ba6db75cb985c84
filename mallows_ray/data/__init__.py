"""Preference data: readers and normalisers, tokenization, reference scoring, the Ray Data pipeline."""
