"""The runtime: the launcher, its workers, what they share, and the progress they print."""
