"""Executor: pipelines, ONNX inference, batching, caching, routing, safe side effects, load."""
