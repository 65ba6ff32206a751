"""Regression experiments run through the same config groups, tracking and checkpoint rules as classification.

``cfg.task`` picks one: ``tabular_regression`` (MarketSentinel MLP over HDF5 features, ``marketsentinel.py``) or
``text_regression`` (Qwen2 regression head over article text, ``article.py``); ``runner.py`` dispatches.
"""
