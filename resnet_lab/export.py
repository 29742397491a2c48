"""`python -m resnet_lab.export`: the command lives in resnet_lab/trained/export.py."""

from resnet_lab.trained.export import main
from resnet_lab.trained.load import main as run_command

if __name__ == "__main__":
    run_command(main)
