"""The package logger; ``NANOVLLM_LOG_LEVEL`` (DEBUG, INFO, WARNING, ERROR; ``nanovllm/envs.py``) sets its level."""
import logging

from nanovllm import envs


def get_logger() -> logging.Logger:
    logger = logging.getLogger("nanovllm")
    if not getattr(logger, "_nanovllm_configured", False):
        level = envs.get("NANOVLLM_LOG_LEVEL")
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s nanovllm %(levelname)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False
        logger._nanovllm_configured = True
    return logger


logger = get_logger()
