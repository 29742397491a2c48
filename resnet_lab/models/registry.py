from resnet_lab.registry import Registry

MODELS = Registry("model")
