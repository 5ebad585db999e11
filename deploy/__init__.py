"""CollaFuse."""
