"""secfwt: private forward-only prompt tuning and inference of transformers with two-server MPC.

Layers, imported in one direction only::

    ring -> sharing (comm, context, dealer, share) -> protocols -> approx -> nn -> tuning -> cli
"""

__version__ = "0.1.0"
