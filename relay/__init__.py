"""Remote Care relay broker and agent."""

__version__ = "0.1.0"
