"""kimi_desk.bench: the measurements, apart from the product (this folder, packaging/bench/).

The modules behind `kimi-desk bench`: cpu (the CPU harness, cpu/cpu_bench.py), kernels (the Triton kernels
beside fla-core), model (the whole model on a GPU), offload (the model under a GPU memory budget), sessions
and threads; random_checkpoint writes and builds random models in the official layout for them and for
the tests. The folder also holds scripts that are not installed: gpu_checks/ (one-off GPU checks),
llama_cpp/ (llama.cpp on the same checkpoints) and quantization_quality.py.

This package may import the product (kimi_desk.engine, kimi_desk.kernels); the product never imports it,
except app/cli.py's `bench` entry points, lazily (tests/test_layering.py).
"""
