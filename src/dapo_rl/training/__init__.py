"""The trainer loop, checkpoints, the built-in quickstart model and run composition."""
