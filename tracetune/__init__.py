"""tracetune: an observability and cost-optimization control plane for AI task pipelines."""

__version__ = "0.1.0"
