"""alignkit: the language-model alignment stack."""

__version__ = "0.1.0"
