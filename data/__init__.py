"""Datasets: data/<name>/ holds train.bin, val.bin and meta.json, written by
`python -m data.<name>.prepare` (run from the repository root)."""
