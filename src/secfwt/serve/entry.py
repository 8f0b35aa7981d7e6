"""Importable server programs for ``secfwt party`` (real processes): the model service on a share file."""

from __future__ import annotations

import os
from pathlib import Path

from secfwt.context import PartyContext
from secfwt.errors import ConfigError
from secfwt.serve.session import serve_model
from secfwt.serve.shares import load_server_shares


def serve_from_env(ctx: PartyContext) -> int:
    """Serve the model whose shares are in ``$SECFWT_SHARE_FILE`` (one file) or ``$SECFWT_SHARES_DIR``
    (the directory from ``secfwt share-model``: ``server0.safetensors`` / ``server1.safetensors``)."""
    f = os.environ.get("SECFWT_SHARE_FILE")
    d = os.environ.get("SECFWT_SHARES_DIR")
    if f:
        path = Path(f)
    elif d:
        path = Path(d) / f"server{ctx.rank}.safetensors"
    else:
        raise ConfigError("no share file: set --shares (SECFWT_SHARE_FILE) or SECFWT_SHARES_DIR")
    return serve_model(ctx, load_server_shares(path, ctx.rank))
