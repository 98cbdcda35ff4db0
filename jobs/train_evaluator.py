"""Train the evaluation classifier whose features and softmax score a sweep's samples.

    python jobs/train_evaluator.py data_root=outputs/data/fashion_mnist \
        out=outputs/evaluators/fashion_mnist epochs=2

Keys are top level (see cfgd.evaluate.evaluator_config.EvaluatorConfig); object storage under
``storage.`` (e.g. storage.endpoint_url=http://127.0.0.1:8333). ``out`` may be an
s3:// URI. Prints the test accuracy and writes model.safetensors + meta.json.
"""

from cfgd.cli import fail, parse
from cfgd.evaluate.evaluator_config import EvaluatorConfig, validate_evaluator_config
from cfgd.evaluate.evaluator_training import train_evaluator


if __name__ == "__main__":
    cfg = parse(__doc__, schema=EvaluatorConfig, check=validate_evaluator_config)
    try:
        evaluator, where = train_evaluator(cfg)
    except ValueError as err:
        fail(err)
    print(f"test accuracy: {evaluator.test_accuracy:.4f}\nevaluator: {where}")
