"""Prediction's child side: the device process that holds the network (`device.py`), and a worker's steps for one
case (`case.py`). The orchestrator's side is `predict/`."""
