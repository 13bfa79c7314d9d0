"""What every layer above shares: the runtime (device, precision, seeds, the process group) and
the construction of a method from a config. Both the trainer and the evaluation build on it, so
neither has to import the other."""
