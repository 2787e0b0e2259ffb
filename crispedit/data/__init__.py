"""Inputs: edit requests (records and readers) and capability corpora."""
