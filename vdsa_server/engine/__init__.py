"""The descriptor engine layer: a binding to the native engine (``native/engine``)."""

from vdsa_server.engine.native import (
    ALL_OPCODES,
    ENV_ENGINE,
    DmaCounters,
    Engine,
    EngineDmaRegion,
    EngineError,
    EngineLibrary,
    WqCounters,
    load_engine,
)

__all__ = [
    "ALL_OPCODES",
    "ENV_ENGINE",
    "DmaCounters",
    "Engine",
    "EngineDmaRegion",
    "EngineError",
    "EngineLibrary",
    "WqCounters",
    "load_engine",
]
