"""Two-server protocols on :class:`~secfwt.share.AShare` values. Each takes the party context explicitly."""
