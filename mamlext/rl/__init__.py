"""Meta-reinforcement learning on mamlext: policies, task environments, sampling, advantages and MAML-TRPO."""
