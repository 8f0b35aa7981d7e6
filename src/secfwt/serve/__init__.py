"""Serving a secret-shared model, encoder or decoder: the model owner's share files (:mod:`.shares`,
:mod:`.decoder`), the servers' one command loop and chunked forward (:mod:`.session`, :mod:`.rows`), their entry
point (:mod:`.entry`, by share-file format) and the data owner's client.

Sits between :mod:`secfwt.nn` and :mod:`secfwt.tuning`: it knows models and shares, not tasks or optimisers.
"""
