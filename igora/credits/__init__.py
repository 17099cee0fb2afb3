"""Credits (docs/credits.md): workers earn by serving, askers spend, no one forges them.

- ``pricing``: the price rule and its constants, one home, published in ``dir``;
- ``receipts``: receipts signed by askers, claims presented by workers, and their checks;
- ``transfer``: transfer orders signed by their sender;
- ``ledger``: the market's SQLite ledger, idempotent settlement, grants, transfers;
- ``entries``: a ledger's entries, their keys and hash chain, and the audit of them;
- ``writer``: the ledger from an event loop, one transaction per 50 ms tick;
- ``command``: ``igora credits`` and ``igora credits send``.

The market's side is ``igora.market.v3.bank``; askers sign receipts (``igora.v3.asker``),
workers claim (``igora.v3.worker``), the broker orders by standing (``igora.v3.broker``).
docs/credits.md §0 says what is built and what is not.
"""
