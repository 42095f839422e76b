"""The KV-cached batched sampler (see sampler.py for the API and how the pieces fit)."""
from minir1ci.inference.engine.sampler import Sampler
from minir1ci.inference.engine.sequence import Completion, SamplingParams

__all__ = ["Sampler", "SamplingParams", "Completion"]
