"""Communication between parties: message framing, an in-process transport and a TLS/TCP transport."""

from secfwt.comm.base import DEALER, OWNER, PARTY_NAMES, SERVER0, SERVER1, Communicator, Frame

__all__ = ["DEALER", "OWNER", "PARTY_NAMES", "SERVER0", "SERVER1", "Communicator", "Frame"]
