"""The torch backend: transformers on CPU or GPU, with a lean CPU forward, weight formats, C kernels and a sampler."""
