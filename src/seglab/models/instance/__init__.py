"""Instance segmentation architectures; importing registers them."""
