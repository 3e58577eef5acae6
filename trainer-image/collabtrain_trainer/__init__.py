"""The collabtrain trainer: a coordinator and peers that average compressed gradients.

Importing this package (or its `config` and `protocol` modules) must not import torch: the
operator imports the HTTP contract from here.
"""
