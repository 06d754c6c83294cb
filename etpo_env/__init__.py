"""etpo-gym: Gymnasium environments in which language-model agents write data-science code."""

__version__ = "0.1.0"
