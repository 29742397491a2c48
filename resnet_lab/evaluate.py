"""`python -m resnet_lab.evaluate`: the command lives in resnet_lab/trained/evaluate.py."""

from resnet_lab.trained.evaluate import main

if __name__ == "__main__":
    main()
