"""minir1ci: R1-Code-Interpreter training, from scratch in PyTorch."""
