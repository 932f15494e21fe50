"""rayinfer's load-test tool: `python -m loadtest --help`."""
