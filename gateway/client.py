"""Kept for existing code: ``from gateway.client import Client`` is :mod:`gateway.sdk.client`
(``from fedgate import Client`` is the installed package's spelling)."""

from gateway.sdk.client import *  # noqa: F403
from gateway.sdk.client import __all__  # noqa: F401
