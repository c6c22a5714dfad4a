"""The error type of the core maths.

Core functions know nothing of the configuration, so they name their own arguments (``window.start``,
``survivors``); the configuration layer catches :class:`CoreError` and re-raises it naming the config key.
"""

from __future__ import annotations


class CoreError(ValueError):
    """A value the core maths cannot work with; the message names the argument and what is accepted."""
