"""What a run reports: named metrics (loss, throughput, MFU, memory, data position), their
sinks (metrics.jsonl, the console, wandb), step timing, and the overfitting detector."""
