"""ftl: fine-tuning launcher for LLMs."""

__version__ = "0.1.0"
