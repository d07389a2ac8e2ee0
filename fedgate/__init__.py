"""fedgate for researchers: ``pip install fedgate`` and ``from fedgate import Client``.

The researcher SDK (:mod:`gateway.sdk`) under its package name; the node (gateway, engine,
ledger services) needs ``pip install 'fedgate[node]'``. Example::

    from fedgate import Client
    client = Client("http://127.0.0.1:8620", key="alice.key", node_public_key="node.pub")
    print(client.datasets())
"""

from importlib.metadata import PackageNotFoundError, version

from gateway.sdk import *  # noqa: F403
from gateway.sdk import __all__ as _sdk_names

try:
    __version__ = version("fedgate")
except PackageNotFoundError:  # a source checkout that is not installed
    __version__ = "0+unknown"

__all__ = [*_sdk_names, "__version__"]
