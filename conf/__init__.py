"""Makes conf/ importable as resnet_lab.conf, so Hydra finds it through pkg:// in any install."""
