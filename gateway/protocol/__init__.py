"""The wire protocol between researchers and nodes, as plain values.

Modules here are pure: they import the standard library, ``cryptography`` (Ed25519, for the
release signature), other ``gateway.protocol`` modules and ``ledger.canonical`` /
``ledger.keys`` / ``ledger.ranges`` only, never a server library (Starlette, SQLModel, Casbin) or TensorFlow,
so the researcher SDK can use them with light dependencies: ``problems`` (problem types),
``signing`` (what a request signature covers), ``job_parameters`` (the one table of job
parameters), ``release`` (the signed release manifest, signed and verified side by side),
``node_document`` (the key a node signs with, signed by it: checked before a submit).
``tests/test_layering.py`` holds this rule.
"""
