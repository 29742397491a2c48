"""Many runs: the end-of-sweep summary and `python -m resnet_lab.sweeps.compare`, and the Optuna search (a Hydra sweeper)."""
