"""aisandbox: an OpenAI-compatible inference server for Mistral-7B (TensorRT-LLM) and small models (torch)."""

__version__ = "0.1.0"
__all__ = ["__version__"]
