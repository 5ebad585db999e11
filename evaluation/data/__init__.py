"""Dataset preparation (docs/design.md §9): the bundled digits, partitioning across clients, CIFAR-10 and CelebA
readers, per-client shard writing, and the ``collafuse-data`` CLI."""
