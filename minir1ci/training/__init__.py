"""Training: SFT data, losses, the SFT and RL loops, the critic, run directories, optimizer, distributed."""
