"""The prepared-dataset contract every wing reads: the manifest and its Parquet shards."""
