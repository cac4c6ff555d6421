"""The TensorRT-LLM backend: the only package that imports tensorrt_llm (lazily)."""
