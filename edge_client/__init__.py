"""The device side of dlora: data, embedding, head, loss, LoRA, the training loop, the daemon and the CLI."""
