"""Dataset preparation (DESIGN 5): the bundled digits, partitioning across clients, CIFAR-10 and CelebA readers,
per-client shard writing, and the ``collafuse-data`` CLI."""
