"""Serving registry modules with an inference engine (vLLM): see :mod:`registry.serving.vllm_plugin`."""
