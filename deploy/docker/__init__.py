"""Building and running CollaFuse's Docker images on a machine without a container registry."""
