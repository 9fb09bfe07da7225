"""A pre-fork Tornado service built to hold, and prove, thousands of connections."""

__version__ = "0.1.0"
