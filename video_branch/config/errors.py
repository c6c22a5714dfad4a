"""The configuration layer's error type."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, reported before any model is loaded; the message names the key and what is
    accepted."""
