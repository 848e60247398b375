"""zoo: fine-tune diverse timm backbones and ensemble them.

Importing ``zoo`` does not import torch: the ensemble commands work on prediction
files with numpy and scipy alone, so they start fast.
"""

__version__ = "0.1.0"
