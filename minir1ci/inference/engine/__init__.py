"""The KV-cached batched sampler (see sampler.py for the API and how the pieces fit)."""
from .sampler import Sampler
from .sequence import Completion, SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion"]
