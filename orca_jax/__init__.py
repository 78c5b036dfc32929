"""orca-jax: Orca's iteration-level scheduling and selective batching for GPT models in JAX."""
from .request import FinishReason, RequestOutput, SamplingParams, Usage

__all__ = ["LLM", "SamplingParams", "RequestOutput", "FinishReason", "Usage", "Engine", "EngineConfig"]
__version__ = "0.1.0"


def __getattr__(name):  # lazy: `import orca_jax` stays cheap for host-only users and the CLI
    if name == "LLM":
        from .llm import LLM
        return LLM
    if name == "Engine":
        from .engine import Engine
        return Engine
    if name == "EngineConfig":
        from .config import EngineConfig
        return EngineConfig
    raise AttributeError(name)
