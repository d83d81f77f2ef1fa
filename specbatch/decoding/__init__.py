"""The decoding engine: token ids in, token ids and step records out (torch + transformers only)."""

from .engine import Engine, EngineStats
from .params import GenerationRequest, GenerationResult, SamplingParams, StepRecord

__all__ = ["Engine", "EngineStats", "GenerationRequest", "GenerationResult", "SamplingParams", "StepRecord"]
