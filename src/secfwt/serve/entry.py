"""Server programs: serve a share file, encoder or decoder, as its ``format`` metadata says.

:func:`serve_from_env` is the program of ``secfwt party --role server0 --shares FILE`` (real processes, on
this host or a remote one); :func:`shares_dir_program` is the same for in-process parties.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from secfwt.context import PartyContext
from secfwt.errors import ConfigError
from secfwt.serve import decoder, shares
from secfwt.serve.session import BaseServer, ModelServer, serve_loop


def server_factory(path: str | Path, rank: int) -> Callable[[PartyContext], BaseServer]:
    """Read this server's share file once (``secfwt-shares-1``: encoder, ``secfwt-decoder-shares-1``: decoder)
    and return a function that builds a fresh server on it for each session (the shares are never modified)."""
    fmt = shares.share_format(path)
    if fmt == shares.FORMAT:
        enc = shares.load_server_shares(path, rank)
        return lambda ctx: ModelServer(ctx, enc)
    if fmt == decoder.FORMAT:
        dec = decoder.load_decoder_shares(path, rank)
        return lambda ctx: decoder.DecoderServer(ctx, dec)
    raise ConfigError(f"{path}: unknown share format {fmt!r}, expected {shares.FORMAT!r} or {decoder.FORMAT!r}")


def serve_file(ctx: PartyContext, path: str | Path) -> int:
    """Serve this server's share file (encoder or decoder) for one session; returns the number of forward
    commands served."""
    return serve_loop(ctx, server_factory(path, ctx.rank)(ctx))


def serve_from_env(ctx: PartyContext) -> int:
    """Serve the model whose shares are in ``$SECFWT_SHARE_FILE`` (one file) or ``$SECFWT_SHARES_DIR``
    (the directory from ``secfwt share-model`` or the decoder's share cache: ``server{0,1}.safetensors``)."""
    f = os.environ.get("SECFWT_SHARE_FILE")
    d = os.environ.get("SECFWT_SHARES_DIR")
    if f:
        path = Path(f)
    elif d:
        path = Path(d) / f"server{ctx.rank}.safetensors"
    else:
        raise ConfigError("no share file: set --shares (SECFWT_SHARE_FILE) or SECFWT_SHARES_DIR")
    return serve_file(ctx, path)


def shares_dir_program(shares_dir: str | Path) -> Callable[[PartyContext], int]:
    """The servers' program for a share directory (``server{rank}.safetensors``), encoder or decoder."""

    def prog(ctx: PartyContext) -> int:
        return serve_file(ctx, Path(shares_dir) / f"server{ctx.rank}.safetensors")

    return prog


__all__ = ["server_factory", "serve_file", "serve_from_env", "shares_dir_program"]
