"""``list``, ``info`` and ``system``: the store, a model file, and what this machine has."""
