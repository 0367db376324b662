"""Runtime: picking the compute device, DDP process-group helpers, and launching several processes with
torchrun (argv is passed in explicitly)."""
