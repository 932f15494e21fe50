"""Offline batch inference on Ray Data: the online service's models over files of millions of rows.

`python -m batch embed --model all-MiniLM-L6-v2 --input rows.jsonl --output out/` (see batch/cli.py).
Model code lives in models/ and imports no Ray; this package is the Ray Data plumbing around it.
"""
