"""`python -m resnet_lab.compare`, and `load_runs` for notebooks: they live in resnet_lab/sweeps/compare.py."""

from resnet_lab.sweeps.compare import load_runs, main  # noqa: F401  (load_runs: for notebooks)

if __name__ == "__main__":
    main()
