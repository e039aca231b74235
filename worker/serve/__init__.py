"""Service mode (``zerop2p worker --serve``): the worker group runs a session's operations,
forward_backward, optim_step, sampling, saved states, differential privacy, in order; it may
import every layer below it (main, train, state, engine)."""
