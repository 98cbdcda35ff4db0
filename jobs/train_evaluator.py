"""Train the evaluation classifier whose features and softmax score a sweep's samples.

    python jobs/train_evaluator.py data_root=outputs/data/fashion_mnist \
        out=outputs/evaluators/fashion_mnist epochs=2

Keys are top level (see cfgd.evaluate.EvaluatorConfig); object storage under
``storage.`` (e.g. storage.endpoint_url=http://127.0.0.1:8333). ``out`` may be an
s3:// URI. Prints the test accuracy and writes model.safetensors + meta.json.
"""

import argparse

from cfgd.cli import fail
from cfgd.config import ConfigError
from cfgd.config import config_yaml, load_structured
from cfgd.evaluate import EvaluatorConfig, train_evaluator, validate_evaluator_config


def parse(argv=None) -> EvaluatorConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML file with EvaluatorConfig keys")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. epochs=1")
    args = parser.parse_args(argv)
    try:
        cfg = validate_evaluator_config(load_structured(EvaluatorConfig, args.config, args.overrides))
    except ConfigError as err:
        parser.exit(2, f"error: {err}\n")
    print("resolved config:\n" + config_yaml(cfg), flush=True)
    return cfg


if __name__ == "__main__":
    cfg = parse()
    try:
        evaluator, where = train_evaluator(cfg)
    except (ValueError, FileExistsError) as err:
        fail(err)
    print(f"test accuracy: {evaluator.test_accuracy:.4f}\nevaluator: {where}")
