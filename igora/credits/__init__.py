"""Credits (docs/credits.md): workers earn by serving, askers spend, no one forges them.

- ``pricing``: the price rule and its constants, one home, published in ``dir``;
- ``receipts``: receipts signed by askers, claims presented by workers, and their checks;
- ``ledger``: the market's SQLite ledger, a hash chain of entries, idempotent settlement.
"""
