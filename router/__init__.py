"""Persona inference (encoder, classifier, thresholds) and the HTTP service."""
