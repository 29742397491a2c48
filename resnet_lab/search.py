"""`python -m resnet_lab.search SWEEP_DIR`: a search's best trial and plots (resnet_lab.sweeps.results)."""

from resnet_lab.sweeps.results import main

if __name__ == "__main__":
    main()
