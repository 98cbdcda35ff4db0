"""The data layer: image sources, the Parquet shard format, PNG/array conversions and the
in-process split reader. Plain numpy/pyarrow/fsspec: it imports neither Ray nor the model,
so data preparation, Ray Data's decode tasks and ``cfgd.config`` load it cheaply (no torch
at import time). Training's Ray Data reader is :mod:`cfgd.train.input_pipeline`.
"""
