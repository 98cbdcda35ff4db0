"""Sample-quality evaluation: a small classifier trained on the real data
(:mod:`.evalnet`, :mod:`.evaluator_training`, configured by :mod:`.evaluator_config`),
its stored artifact and the real data it scores against (:mod:`.evaluator`), the
metrics (:mod:`.metrics`: FID, IS, precision/recall, accuracy) and paper-comparable
FID in InceptionV3 features (:mod:`.fid_inception`).
"""
