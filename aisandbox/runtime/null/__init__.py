"""The null backend: canned tokens through the real tokenizer, to measure the HTTP tier alone."""
