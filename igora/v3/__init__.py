"""Igora protocol 3: owned documents, identities, scoped traffic (docs/protocol-v3.md).

- ``wire``: the frames on a v3 websocket;
- ``documents``: document names, their owners and read rules;
- ``handshake``: the challenge a connection answers before it joins a room;
- ``session``: an agent's connection to a v3 room (what the v3 roles build on), with
  ``known_markets`` (the market keys it trusts) and ``outbox`` (how frames are batched);
- the roles (step 3): ``tasks`` (the task schema), ``flow`` (the broker's decisions),
  ``asker`` (behind ``igora.Client``), ``broker``, ``worker``, ``roles`` (the commands).
"""
