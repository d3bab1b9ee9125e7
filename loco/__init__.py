"""loco: local (block-wise) contrastive pretraining of timm backbones, and its evaluation."""

__version__ = "0.1.0"
