"""`python -m resnet_lab.predict`: the command lives in resnet_lab/trained/predict.py."""

from resnet_lab.trained.predict import main

if __name__ == "__main__":
    main()
