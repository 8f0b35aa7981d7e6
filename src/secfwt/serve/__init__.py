"""Serving a secret-shared model: the model owner's share files, the servers' forward loop, the data owner's client.

Sits between :mod:`secfwt.nn` and :mod:`secfwt.tuning`: it knows models and shares, not tasks or optimisers.
"""
