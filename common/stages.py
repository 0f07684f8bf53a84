"""The pipeline's stages, in order: a module of its own so that the CLI's parser can name them
without importing the run-folder readers (pandas, pyarrow) before a command runs."""

STAGES = ("manifest", "embed", "dedup", "cluster", "retrieve", "shards", "report")
