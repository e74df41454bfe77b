"""The experiment on disk: its folder layout (``layout``) and its SQLite state and lock (``state``)."""
