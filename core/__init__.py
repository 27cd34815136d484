"""Influence Casebook core: influence-directed explanations of PyTorch CNNs.

Leino, Sen, Datta, Fredrikson, Li. "Influence-Directed Explanations for Deep
Convolutional Networks", ITC 2018 (arXiv 1802.03788).

This package never imports Streamlit; the chapters in ``chapters/`` only draw what it returns.
"""

__version__ = "0.1.0"
