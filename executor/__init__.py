"""The executor runtime: pipelines of steps that batch, cache, route and cascade, tuned by name.

A pipeline is declared once and the runtime does the rest: spans and metrics for every step, the
knobs each step declares registered with the tuner, new values applied while tasks run.

    from tracetune.executor import Batching, Cache, Cascade, Infer, Pipeline, Step

The ticket-triage demo (`tracetune.demo.triage`) is built on exactly this API.
"""

from tracetune.executor.effects import DeadLetters, RetryPolicy, SideEffect, SideEffectFailed
from tracetune.executor.llm import ChatClient, LabelModel, LLMAnswer, LLMError
from tracetune.executor.onnx import OnnxModel
from tracetune.executor.pipelines import Pipeline, Task
from tracetune.executor.steps import Batching, Cache, Cascade, Effect, Infer, InputError, Remote, Step, StepError

__all__ = ["Pipeline", "Task", "Step", "Infer", "Cascade", "Effect", "Batching", "Cache", "Remote", "StepError",
           "InputError", "ChatClient", "LabelModel", "LLMAnswer", "LLMError", "OnnxModel", "RetryPolicy",
           "SideEffect", "SideEffectFailed", "DeadLetters"]
