"""Data for federated fine-tuning: loaders, client partitions, and response-only tokenization."""

from fedllm.data.format import collate, format_example, tokenize_all
from fedllm.data.fortunes import load_fortunes
from fedllm.data.local import load_local
from fedllm.data.partition import partition, split_held_out
from fedllm.data.sample import sample_examples
from fedllm.data.sources import load_examples
from fedllm.data.wordnet import load_wordnet

__all__ = [
    "collate",
    "format_example",
    "load_examples",
    "load_fortunes",
    "load_local",
    "load_wordnet",
    "partition",
    "sample_examples",
    "split_held_out",
    "tokenize_all",
]
