"""Processes and communication: rank discovery, process groups, DeepSpeed set-up, gradient compression, SLURM."""
