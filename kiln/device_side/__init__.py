"""Code that runs ON devices: Python 3.6, standard library only."""
