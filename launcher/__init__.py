"""zerolaunch: YAML run spec + DeepSpeed JSON -> ZeRO-sharded GPT training."""
