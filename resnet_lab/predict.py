"""`python -m resnet_lab.predict`: the command lives in resnet_lab/trained/predict.py."""

from resnet_lab.trained.predict import main
from resnet_lab.trained.load import main as run_command

if __name__ == "__main__":
    run_command(main)
