"""Ray actors that hold a model, run the engine on a shard and write its results."""
