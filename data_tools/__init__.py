"""The dataset sharding tool: images -> VAE latents -> WebDataset shards with a manifest."""
