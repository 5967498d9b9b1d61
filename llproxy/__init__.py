"""llproxy: one OpenAI-compatible endpoint in front of every LLM server it can find."""

__version__ = "0.1.0"
