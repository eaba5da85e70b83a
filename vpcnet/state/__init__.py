"""The plugin's memory: the sqlite store (desired state) and the locks around it."""
