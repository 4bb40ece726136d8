"""The training core: the factory that builds a run's parts from the config, the `Trainer`
(one backward per step, evaluation, checkpoints, summary), sharding and optimizers, the
non-finite guard, and torch.distributed.checkpoint with its safety checks."""
