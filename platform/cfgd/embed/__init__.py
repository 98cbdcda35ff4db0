"""The embedding layer: ``jobs/embed.py``, batch inference that adds an ``embedding``
condition column to existing Parquet shards (:mod:`.embed_runner`, Ray Data over an actor
pool), its config (:mod:`.embed_config`) and the encoders the project ships
(:mod:`.encoders`: the evaluator's penultimate features, a seeded random projection). A
user's own encoder is named by import path (``module:callable``).
"""
