"""Adapters for RL trainers. Each needs its trainer installed and is imported by name,
e.g. ``from vocabmetric.integrations.trl import VocabMetricGRPOTrainer``."""
