"""One transformer encoder definition over two backends (plaintext oracle, MPC).

See :mod:`secfwt.nn.encoder` (model), :mod:`secfwt.nn.attention` (mechanisms), :mod:`secfwt.nn.heads`
(classification heads), :mod:`secfwt.nn.inputs` (embedding modes) and docs/ATTENTION.md.
"""

from secfwt.nn.attention import SelfAttention
from secfwt.nn.backend import Backend, PlainBackend
from secfwt.nn.config import AttentionConfig, AttentionKind, EncoderConfig
from secfwt.nn.encoder import Embeddings, Encoder, EncoderLayer, EncoderOutput, FeedForward

__all__ = [
    "AttentionConfig", "AttentionKind", "Backend", "Embeddings", "Encoder", "EncoderConfig", "EncoderLayer",
    "EncoderOutput", "FeedForward", "PlainBackend", "SelfAttention",
]
