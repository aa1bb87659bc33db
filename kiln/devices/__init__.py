"""What devices are: the probe, parsers of what they print, hardware classes, their working area."""
