"""Storage and artifacts: URIs and filesystems for local paths and ``s3://``
(:mod:`.storage`), access checks (:mod:`.access`), transfers and atomic writes
(:mod:`.transfers`, :mod:`.atomic`), retries (:mod:`.retry`), self-describing verified
artifact directories (:mod:`.artifact`) and model checkpoints (:mod:`.checkpoint`).
It reads and writes files; it never imports the model's code.
"""
