"""The package logger; ``NANOVLLM_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR) sets its level."""
import logging
import os

_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def get_logger() -> logging.Logger:
    logger = logging.getLogger("nanovllm")
    if not getattr(logger, "_nanovllm_configured", False):
        level = os.environ.get("NANOVLLM_LOG_LEVEL", "INFO").upper()
        if level not in _LEVELS:
            raise ValueError(f"NANOVLLM_LOG_LEVEL must be one of {_LEVELS}, got {level!r}")
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s nanovllm %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
        logger._nanovllm_configured = True
    return logger


logger = get_logger()
