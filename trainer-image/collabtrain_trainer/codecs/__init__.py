"""Gradient codecs: fixed-size payloads per element count, plus PowerSGD's factor math.

Imports torch and, of collabtrain_trainer, only the config.
"""

from collabtrain_trainer.codecs.base import Codec, ErrorFeedback, make_codec
from collabtrain_trainer.codecs.floating import BFloat16Codec, Float16Codec, NoneCodec
from collabtrain_trainer.codecs.powersgd import PowerSGD, PowerSGDRound
from collabtrain_trainer.codecs.quantize import BlockQuantCodec
from collabtrain_trainer.codecs.topk import TopKCodec

__all__ = [
    "BFloat16Codec",
    "BlockQuantCodec",
    "Codec",
    "ErrorFeedback",
    "Float16Codec",
    "NoneCodec",
    "PowerSGD",
    "PowerSGDRound",
    "TopKCodec",
    "make_codec",
]
