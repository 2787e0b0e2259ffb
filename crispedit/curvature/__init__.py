"""Capability curvature: K-FAC statistics, eigenbases, energy masks, matrix-free projectors and their cache."""
