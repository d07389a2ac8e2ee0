"""The researcher SDK: signed requests to a fedgate node, verified releases.

Light by construction: it needs httpx, cryptography, http-message-signatures, tqdm and numpy
(released weights are arrays), never a server library (Starlette, SQLModel, Casbin) or
TensorFlow, which it imports only to convert a Keras model or to rehearse locally (the
``node`` extra). ``tests/test_layering.py`` holds that rule; ``tests/test_light_wheel.py``
installs the wheel without extras on another Python and runs a job against a live node.

    from fedgate import Client   # the same object as gateway.sdk.Client
"""

from gateway.sdk.client import *  # noqa: F403  (the SDK's public names: Client, Job, …)
from gateway.sdk.client import __all__  # noqa: F401
