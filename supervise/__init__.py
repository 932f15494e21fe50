"""Run rayinfer's Ray cluster as a service: one stop request drains it within a bound, a second stops
it at once, nothing of it outlives the stop, and a start after a crash cleans up the crashed run's
leftovers (`python -m supervise --help`; README "Starting and stopping")."""
