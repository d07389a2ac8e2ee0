"""Cross-silo federation: one model trained across several fedgate nodes.

``core`` is the pure part (the nodes list, the local job's parameters, the composition
identity, aggregation and the signed federation manifest); ``coordinator`` runs a federation
as an ordinary signed client of every node (``gateway.sdk``). It needs only the researcher's
light install, and no node imports it. See docs/federation.md.
"""
