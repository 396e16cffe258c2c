"""A tiny randomly initialised BERT written to a folder: the text encoder of most tests (there is
no model hub here, and CI must stay fast). Importable from tests (``pythonpath`` in pyproject).
"""
from __future__ import annotations

from pathlib import Path


def write_tiny_bert(folder: Path, *, layers: int = 2, hidden: int = 32) -> Path:
    """A randomly initialised BERT (hidden 32, 2 layers) with a word-level tokenizer over the
    synthetic transcripts' words, saved as a Hugging Face model folder."""
    import torch
    import transformers
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from msa.platform.data.synth import vocabulary

    transformers.utils.logging.disable_progress_bar()
    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *vocabulary()]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(words)}, do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
