"""Tools around the runtime, not part of it (DESIGN 4): metrics (FID/KID/FCD, accuracy probe, ``collafuse-eval``)
and dataset preparation (``collafuse-data``). Neither server nor client imports this package."""
