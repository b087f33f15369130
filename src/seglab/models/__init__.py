"""Segmentation models, created by name through the registry."""
from seglab.models.registry import ModelEntry, UnknownModelError, create_model, get_model_entry, list_models, register_model

__all__ = ["ModelEntry", "UnknownModelError", "create_model", "get_model_entry", "list_models", "register_model"]
