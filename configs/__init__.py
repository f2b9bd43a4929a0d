"""Experiment configs: `get_config(arg=None)` files for `experiments/run.py`."""
