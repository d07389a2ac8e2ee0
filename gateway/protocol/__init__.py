"""The wire protocol between researchers and nodes, as plain values.

Modules here are pure: they import the standard library, other ``gateway.protocol``
modules and ``ledger.canonical`` only, never a server library (Starlette, SQLModel,
Casbin) or TensorFlow, so the researcher SDK can use them with light dependencies.
``tests/test_layering.py`` holds this rule.
"""
