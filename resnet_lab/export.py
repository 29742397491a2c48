"""`python -m resnet_lab.export`: the command lives in resnet_lab/trained/export.py."""

from resnet_lab.trained.export import main

if __name__ == "__main__":
    main()
