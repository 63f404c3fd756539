"""Several server processes as one service: the Redis delivery bus and its sequencer."""
