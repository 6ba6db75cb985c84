"""Preference data: readers, format detection and normalisers, rejects, tokenization, reference scoring, the
prepare pipeline and its cache, and the reader of a scored split."""
