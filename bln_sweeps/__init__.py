"""bln_sweeps: train, evaluate and log one GPT-2 run with a pluggable normalization layer.

Importing this package is cheap (no torch): login-node tools import it for its config schemas.
"""

__version__ = "0.1.0"
