"""What the model has learned: held-out loss during training, and text sampled from it."""
