"""llmproxy: an OpenAI-compatible proxy that is correct to the byte and costs almost nothing."""

from llmproxy.app import create_app
from llmproxy.config import Configuration, ConfigurationError, get_configuration

__all__ = ["Configuration", "ConfigurationError", "create_app", "get_configuration"]
