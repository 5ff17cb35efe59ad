"""zerolaunch: train GPT models with DeepSpeed ZeRO from a YAML run spec and a DeepSpeed JSON.

The modules at this level are the commands (`zerolaunch COMMAND`, or `python -m launcher.NAME`):
run (train), check, bench, sample, export, ckpt, report; `errors` is what they share. The
sub-packages are the library they are built from, each with one role:

    config/       the run spec and the DeepSpeed JSON, read, checked and resolved
    runtime/      the job: ranks under any launcher, Slurm, signals and time limits
    training/     the pre-flight plan, the engine, one step, the loop, schedule, memory
    checkpoints/  what a checkpoint holds, the sharded store, universal conversion, HF layout
    monitoring/   metrics and their sinks (metrics.jsonl, wandb), timing, MFU, overfitting
    evaluation/   held-out loss and sampled text

No command imports another command, and no library module imports a command.
"""
