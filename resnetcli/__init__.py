"""resnetcli: classify images with torchvision's pretrained models, and inspect the models."""

__version__ = "0.1.0"
