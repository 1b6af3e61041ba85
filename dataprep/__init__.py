"""Data preparation: url lists -> webdataset shards, BPE tokenizers, dVAE token shards, the synthetic demo set."""
