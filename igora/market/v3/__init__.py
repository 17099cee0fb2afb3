"""The market's rooms of protocol 3 (docs/protocol-v3.md; ``igora market --secure``,
``--v3-room NAME``).

- ``connection``: one socket: the handshake, then its frames checked on names;
- ``room``: a room's documents, subscriptions and identities; the v3 rooms in memory;
- ``doclog``: a document's update log and its way to the store;
- ``lease``, ``market_docs``: the broker lease; ``dir`` and ``who``;
- ``replicas``: a room shared with the other replicas through Redis (``--redis``).
"""
