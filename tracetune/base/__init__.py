"""The ground every component stands on: settings, the HTTP serving guard, retry policies, and the
batching and caching rules the executor and the simulation share. It imports no other tracetune module."""
