"""`aisandbox build-engine`: compile a TensorRT-LLM engine tuned for one GPU type.

Stages, each a typed function: validate the checkpoint (`checkpoint`), resolve the GPU profile (`profiles`,
`detect`), plan memory (`plan`), build with tensorrt_llm 1.2.1 (`trt_build`, the only module here that imports
tensorrt_llm, lazily), then copy the tokenizer, write the manifest (`aisandbox.artifacts`) and publish the engine
directory with one rename (`pipeline`).
"""
