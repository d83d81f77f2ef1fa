"""specbatch: offline LLM generation at scale, with per-step decoding metrics in SQL."""

__version__ = "0.1.0"
