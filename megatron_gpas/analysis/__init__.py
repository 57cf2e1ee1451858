"""Analyses of trained models (as opposed to training-time metrics).

``kurtosis``: OSP's excess-kurtosis outlier metric over a model's hidden states
(``tools/kurtosis.py``, docs/kurtosis.md).
"""
