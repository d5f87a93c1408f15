"""What a run writes: the output folder and its shards, the manifest, the adapter export."""
