"""optkit: collect, distill, quantize, route, cache, evaluate, export — one measured pipeline.

Importing the package is cheap on purpose: stage modules import torch & co. inside their functions.
"""

__version__ = "0.1.0"
