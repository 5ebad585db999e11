"""Tools around the runtime, not part of it (docs/design.md §11): metrics (FID/KID/FCD, accuracy probe,
``collafuse-eval``) and dataset preparation (``collafuse-data``). Neither server nor client imports this package."""
