"""Errors raised by secfwt. Every message names the problem in one line (what, where, expected vs got)."""


class SecfwtError(Exception):
    """Base class of all secfwt errors."""


class ConfigError(SecfwtError):
    """A configuration file, field or argument is invalid."""


class DataError(SecfwtError):
    """A data file is missing or malformed."""


class CommError(SecfwtError):
    """A communication failure between parties."""


class PeerTimeoutError(CommError):
    """A peer did not answer within the configured timeout."""


class PeerClosedError(CommError):
    """A peer closed its connection or died."""


class PeerAbortedError(CommError):
    """A peer reported that it failed and aborted the run."""


class ProtocolMismatchError(CommError):
    """A message did not match the protocol step, shape or dtype the receiver expected."""


class AuthError(CommError):
    """A peer could not be authenticated (unknown certificate or wrong party name)."""


class StopRequested(SecfwtError):
    """A service was asked to stop (SIGTERM / SIGINT) while it waited for or served a session."""


class FixedPointRangeError(SecfwtError, ValueError):
    """A value or a scale is outside the fixed-point range an operation can represent exactly (an owner input
    beyond the safe bound, a revealed value that can only come from a wrapped ring or a blown range)."""
