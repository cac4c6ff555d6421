"""GPU tests: they need an NVIDIA GPU and tensorrt_llm 1.2.x (NVIDIA's release:1.2.1 image) and skip elsewhere."""
