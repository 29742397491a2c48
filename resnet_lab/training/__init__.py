"""One run's training: the Hydra task (`train.py`) plans the run (`resume.py`) and hands it to the
trainer (`trainer.py`), which runs the hot loop (`engine.py`) with its per-update features
(`features.py`), writes checkpoints (`checkpoint.py`), and sends
its metrics to the console, `metrics.jsonl` and W&B (`tracking.py`; what a W&B part wrote down:
`wandb_records.py`), with the final confusion matrix
(`confusion.py`); as a search's trial it reports to the study after every epoch (`trial.py`)."""
