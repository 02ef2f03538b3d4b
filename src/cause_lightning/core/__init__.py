"""Foundations every layer may import: constants, errors, logging, bounds of settings, model
specs, atomic files and the process's resources. Standard library only."""
