"""What uses a trained run: its config, data, model and weights loaded again (`load.py`), and the
commands `python -m resnet_lab.trained.evaluate`, `.predict` and `.export` (`evaluate.py`, `predict.py`,
`export.py`)."""
