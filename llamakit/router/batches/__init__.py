"""Batches, as OpenAI's Batch API: a file of requests run at a discount on the slots no interactive request wants.

    lines.py    a batch's input file read and bounded (lines, bytes per line, bytes), and the lines of its output
                and error files
    answers.py  the answers of `/v1/files` and `/v1/batches` (OpenAI's FileObject and Batch) as pydantic models
    runner.py   BatchRunner: claims lines, runs each through the paid path (quote, hold, serve, settle), records
                how it ended; cancels, stops a batch the balance can no longer pay, expires a late one

The routes are in `llamakit.router.routes.batches`, the storage in the ledger's database (`ledger.batch_store`,
see `llamakit.router.ledger._batches`), the pricing in docs/money.md#batches.
"""
