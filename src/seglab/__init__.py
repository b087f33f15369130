"""seglab: image segmentation — models, losses, metrics, dense CRF and the engine around them."""
from seglab.models import create_model, list_models

__version__ = "0.1.0"
__all__ = ["create_model", "list_models", "__version__"]
