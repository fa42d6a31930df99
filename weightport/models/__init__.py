"""Small reference architectures of weightport's own, used by the main job and the tests.

They are written to be read: one fused ``qkv`` projection per BERT block, separate ``q``, ``k``,
``v`` projections per GPT-2 block, names that say what a tensor is (``blocks.3.attn.qkv.weight``),
nothing configurable that the ported checkpoints do not need. Weights from other zoos reach them
through the shipped mappings.
"""

from weightport.models.bert import Bert, BertConfig, mean_pool
from weightport.models.gpt2 import GPT2, GPT2Config

__all__ = ["GPT2", "Bert", "BertConfig", "GPT2Config", "mean_pool"]
