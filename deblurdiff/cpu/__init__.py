"""CPU preparation: the feature-based configuration and the model patches it applies (Winograd)."""
