"""Engine-internal micro-benchmarks (run as `python -m aisandbox.bench.micro.NAME`); results in docs/benchmarks.md."""
