"""Training, data, losses, threshold and budget calibration, evaluation and weight import.

Serving never imports this package (tests/model/test_layering.py): `racedit.server` and
`racedit.export` run checkpoints; this is where checkpoints are made.
"""
