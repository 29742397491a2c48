"""`python -m resnet_lab.evaluate`: the command lives in resnet_lab/trained/evaluate.py."""

from resnet_lab.trained.evaluate import main
from resnet_lab.trained.load import main as run_command

if __name__ == "__main__":
    run_command(main)
