"""Entry points beside train.py, run from the repository root as `python -m scripts.<name>`."""
