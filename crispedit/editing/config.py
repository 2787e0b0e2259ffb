"""Editing hyper-parameters: `EditConfig` lives in `crispedit.config` (one home for every stage's config)."""

from crispedit.config import EditConfig, Method

METHODS = Method.values()

__all__ = ["EditConfig", "METHODS"]
