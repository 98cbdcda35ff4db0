"""Add an ``embedding`` condition column to existing shards by running an encoder over them.

    python jobs/embed.py data_root=outputs/data/fashion_mnist out=outputs/data/fashion_mnist_embedded \
        encoder=cfgd.embed.encoders:EvaluatorFeatures 'encoder_args={evaluator: outputs/evaluators/fashion_mnist}'

Keys are top level (cfgd.embed.embed_config.EmbedConfig); object storage under
``storage.``. Ray Data runs the encoder on an actor pool (``num_actors``,
``cpus_per_actor``, ``gpus_per_actor``); rerun to resume: finished shards are kept. Then
train on the result with ``model.condition=embedding data.root=<out>``.
"""

from cfgd.cli import fail, job
from cfgd.embed.embed_config import EmbedConfig, validate_embed_config


if __name__ == "__main__":
    with job(__doc__, "embed", schema=EmbedConfig, check=validate_embed_config) as cfg:
        from cfgd.embed.embed_runner import run

        try:
            out = run(cfg, log=lambda m: print(f"[cfgd.embed] {m}", flush=True))
        except ValueError as err:
            fail(err)
        print("\n".join(f"{split}: {path}" for split, path in out.items()))
