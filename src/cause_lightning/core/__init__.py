"""Foundations every layer may import: bounds of settings, constants, logging, model specs.

Standard library only, so that models, data, stages and the configuration can all depend on them.
"""
