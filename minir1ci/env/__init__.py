"""The environment: prompts, tasks and their verifiers, the sandbox, interpreter rollouts, rewards, evaluation."""
