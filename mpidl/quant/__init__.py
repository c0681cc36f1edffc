"""Post-training quantization of trained runs (`mpidl quantize RUN_DIR`): see quantize.py.

Kept empty so that registering the command does not import torch.
"""
